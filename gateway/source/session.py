"""What paho's callbacks mean, and the paho calls that answer them: one MQTT session.

`PahoSession` implements `gateway.source.loop.Session`: the loop decides when to read and write,
this module decides what a CONNACK, PUBLISH, SUBACK, PUBACK or disconnect does, and what goes on
the wire for the acks, publishes and subscription changes other threads queued in `Outbound`.

Invariants held here:
- paho types never leave this module (and `publishing`, which answers the publishes): every
  PUBLISH becomes a `Message` at once.
- every method runs on the loop thread (callbacks included), so paho is never called from two
  threads and the publish bookkeeping (`publishing`) needs no lock; only the status read by other
  threads (connected, stats, the wait condition) is guarded.
- an exception in a callback or hook is logged in one line and counted, never raised into paho,
  because it would end the loop thread (docs/delivery.md#callbacks-never-block-or-raise).
- an ack owed to an earlier connection never goes out on a new one: on every connection change the
  ack tracker starts a new generation and the outbound drops the acks it holds
  (docs/delivery.md#acks-and-ordering).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import paho.mqtt.client as paho

from gateway.model import Message, now_ms
from gateway.settings.settings import MqttConfig
from gateway.source.acks import AckTracker
from gateway.source.connect import describe_error
from gateway.source.failures import ConnectFailures, closed_before_connack, refused, sharing_unavailable
from gateway.source.hooks import SourceHooks
from gateway.source.outbound import Outbound, Taken
from gateway.source.packets import identified, publish_properties, v5_request
from gateway.source.publishing import Publishes
from gateway.source.subscriptions import SubscriptionBook

__all__ = ["PahoSession", "SourceMetrics"]

log = logging.getLogger("gateway.source.mqtt")

_new_message = partial(tuple.__new__, Message)   # Message(...) without its Python-level __new__

_STATS = ("connects", "connect_failures", "disconnects", "session_lost", "callback_errors", "invalid_topic",
          "subscriptions_refused", "extra_copies")



class SourceMetrics(Protocol):
    """What the source tells the metrics (gateway.ops.metrics.Metrics)."""

    def set_connected(self, connected: bool) -> None: ...
    def set_subscriptions_granted(self, granted: bool) -> None: ...
    def session_lost(self) -> None: ...
    def callback_error(self) -> None: ...
    def invalid_topic(self) -> None: ...


class PahoSession:
    """paho's callbacks and the paho calls that answer them; implements `loop.Session`."""

    def __init__(self, config: MqttConfig, client: Any, *, hooks: SourceHooks, acks: AckTracker,
                 outbound: Outbound, subscriptions: SubscriptionBook, metrics: SourceMetrics | None,
                 clock: Callable[[], float]) -> None:
        self.config = config
        self._client = client
        self._hooks = hooks
        self._acks = acks
        self._outbound = outbound
        self._subscriptions = subscriptions
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stats = dict.fromkeys(_STATS, 0)
        self._connected = False
        self._ever_connected = False
        self._session_present: bool | None = None
        self._connected_at = 0.0
        self._failures = ConnectFailures(log, f"{config.host}:{config.port}")
        self._received = 0
        self._closing = False
        self._no_sharing = False      # the broker said it has no shared subscriptions (MQTT 5 CONNACK)
        self._publishes = Publishes(client, self.callback_failed)
        client.on_connect = self._guard(self._on_connect)
        client.on_disconnect = self._guard(self._on_disconnect)
        client.on_message = self._on_message
        client.on_subscribe = self._guard(self._on_subscribe)
        client.on_unsubscribe = self._guard(self._on_unsubscribe)
        client.on_publish = self._guard(self._on_publish)
        client.on_socket_register_write = _writes_after_the_round

    # -- loop.Session ----------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        return self._client

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def connected_at(self) -> float:
        return self._connected_at

    @property
    def received(self) -> int:
        return self._received

    @property
    def outstanding(self) -> int:
        return self._acks.pending

    @property
    def subscribing(self) -> bool:
        return self._subscriptions.awaiting_suback

    @property
    def session_present(self) -> bool | None:
        return self._session_present

    @property
    def subscriptions_granted(self) -> bool:
        return self._granted()

    @property
    def sharing_refused(self) -> bool:
        """MQTT_SHARE_GROUP is set and the broker said it has no shared subscriptions."""
        return self._no_sharing

    def connect_once(self) -> bool:
        try:
            rc = self._client.reconnect()
        except Exception as exc:  # noqa: BLE001 - refused, DNS, TLS, websocket handshake...
            self._connect_failed(describe_error(exc))
            return False
        if rc != 0:
            self._connect_failed(paho.error_string(rc))
            return False
        return True

    def service(self, taken: Taken) -> None:
        if self._connected:
            ack = self._client.ack
            for mid, qos in taken.acks:
                ack(mid, qos)
        for publish in taken.publishes:
            self._publishes.publish(publish)
        if self._connected and self._subscriptions.dirty and not self._no_sharing:
            self._apply_subscriptions()
            self._metric("set_subscriptions_granted", self._granted())

    def callback_failed(self, name: str, exc: Exception) -> None:
        self._count("callback_errors")
        log.error("error in MQTT %s callback: %s", name, describe_error(exc))
        self._metric("callback_error")

    def closing(self) -> None:
        self._closing = True

    def ended(self) -> None:
        with self._lock:
            self._connected = False
            self._changed.notify_all()

    # -- status ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    # -- paho callbacks (loop thread) ------------------------------------------------------------

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        name = fn.__name__.lstrip("_")

        def guarded(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - never let paho's caller, the loop, die
                self.callback_failed(name, exc)
        return guarded

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._connect_failed(refused(str(reason), int(reason.value), self.config.protocol))
            return
        self._acks.new_connection()     # before anything else: old-connection acks die here
        self._outbound.drop_acks()
        v5 = self.config.protocol == "5"
        identifiers = v5 and getattr(props, "SubscriptionIdentifierAvailable", 1) != 0
        self._subscriptions.new_connection(identifiers=identifiers, session_present=bool(flags.session_present),
                                           retain_handling=v5)
        # A broker without shared subscriptions would take $share/... as a literal filter (nothing
        # arrives) or disconnect us for it (a reconnect storm): subscribe nothing, stay not ready.
        no_sharing = bool(v5 and self.config.share_group and getattr(props, "SharedSubscriptionAvailable", 1) == 0)
        session_present = bool(flags.session_present)
        with self._lock:
            expected = self._ever_connected and bool(self.config.persistent)
            self._connected, self._ever_connected = True, True
            self._session_present = session_present
            sharing_was_refused, self._no_sharing = self._no_sharing, no_sharing
            self._connected_at = self._clock()
            self._stats["connects"] += 1
            lost = expected and not session_present
            if lost:
                self._stats["session_lost"] += 1
            self._changed.notify_all()
        self._failures.connected()
        c = self.config
        log.info("connected to MQTT broker %s:%d as %r (session_present=%s)", c.host, c.port, c.client_id,
                 session_present)
        self._metric("set_connected", True)
        if lost:
            log.warning("broker session lost; messages queued while disconnected may be gone")
            self._metric("session_lost")
        if no_sharing and not sharing_was_refused:
            log.error("%s", sharing_unavailable(str(self.config.share_group)))
        if not no_sharing:
            self._apply_subscriptions()
        self._metric("set_subscriptions_granted", self._granted())

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._outbound.drop_acks()
        with self._lock:
            was, self._connected = self._connected, False
            if was:
                self._stats["disconnects"] += 1
            self._changed.notify_all()
        self._metric("set_connected", False)
        if was:
            log.log(logging.INFO if self._closing else logging.WARNING, "disconnected from MQTT broker: %s", reason)
        elif not self._closing:
            # Closed before CONNACK: the classic cause is a TLS mismatch (plain MQTT to a TLS
            # listener, or TLS to a plain one); a broker at its connection limit does it too.
            self._connect_failed(closed_before_connack(str(reason), self.config.protocol))

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        """Every PUBLISH: guarded like the other callbacks (see `_guard`), inline since it is the hot one."""
        try:
            self._message(msg)
        except Exception as exc:  # noqa: BLE001 - never let paho's caller, the loop, die
            self.callback_failed("on_message", exc)

    def _message(self, msg: Any) -> None:
        self._received += 1
        mid, qos = msg.mid, msg.qos
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._count("invalid_topic")
            self._metric("invalid_topic")
            log.warning("message mid %d has a topic that is not valid UTF-8; acknowledged and dropped", mid)
            self._acks.arrived(mid, qos, 0)
            return
        user_properties, content_type, identifiers = publish_properties(msg.properties)
        if identifiers and not self._subscriptions.routed(topic, identifiers):
            self._extra_copy(mid, qos)
            return
        payload, retain = msg.payload, bool(msg.retain)
        resent = retain and self._subscriptions.resent(topic, identifiers or ())
        self._hooks.intake(_new_message((topic, payload if type(payload) is bytes else bytes(payload), qos, now_ms(),
                                       retain, user_properties, content_type, resent)), mid, qos)

    def _extra_copy(self, mid: int, qos: int) -> None:
        """A second copy of a message that another of our subscriptions also brings (partly
        overlapping filters, MQTT 5): acknowledged, counted, not routed again."""
        with self._lock:
            self._stats["extra_copies"] += 1
            first = self._stats["extra_copies"] == 1
        if first:
            log.info("the broker sends a copy of a message per matching subscription (overlapping filters); "
                     "each message is routed once, by its subscription identifiers")
        self._acks.arrived(mid, qos, 0)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        results = self._subscriptions.suback(mid, [(int(rc.value), str(rc)) for rc in codes])
        for r in results:
            if r.refused:
                self._count("subscriptions_refused")
                log.error("subscription refused: filter %r qos %d: %s", r.topic_filter, r.requested_qos, r.reason)
            else:
                log.info("subscribed: filter %r granted qos %d", r.topic_filter, r.granted_qos)
        with self._lock:
            self._changed.notify_all()
        self._metric("set_subscriptions_granted", self._granted())

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        for rc in codes or ():
            if rc.is_failure:
                log.warning("unsubscribe (mid %d) answered: %s", mid, rc)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._publishes.answered(mid, not reason.is_failure, str(reason))

    # -- paho calls (loop thread) ------------------------------------------------------------------

    def _apply_subscriptions(self) -> None:
        subscribe, unsubscribe = self._subscriptions.plan()
        if subscribe:
            self._subscribe(subscribe)
        # Unsubscribe only after the new filters are asked for: a reload that swaps a/+ for a/#
        # must leave no moment in which the broker has neither (it would not queue the message).
        if unsubscribe:
            self._client.unsubscribe(unsubscribe)
            log.info("unsubscribed: %s", ", ".join(repr(f) for f in unsubscribe))

    def _subscribe(self, subscribe: list[tuple[str, int]]) -> None:
        if self.config.protocol != "5":
            self._send_subscribe(subscribe, list(subscribe), None)
            return
        # Each filter's Retain Handling comes from the route table. A subscription identifier
        # applies to a whole SUBSCRIBE, so a filter with one goes in a packet of its own.
        no_local = not self.config.share_group
        handling = self._subscriptions.retain_handling
        plain: list[tuple[str, int]] = []
        for f, q in subscribe:
            identifier = self._subscriptions.identifier(f)
            if identifier is None:
                plain.append((f, q))
                continue
            self._send_subscribe([(f, q)], v5_request([(f, q)], no_local, handling), identified(identifier))
        if plain:
            self._send_subscribe(plain, v5_request(plain, no_local, handling), None)

    def _send_subscribe(self, subscribe: list[tuple[str, int]], request: list[Any], props: Any) -> None:
        try:
            rc, mid = (self._client.subscribe(request) if props is None
                       else self._client.subscribe(request, properties=props))
        except ValueError as exc:
            failed = self._subscriptions.send_failed(subscribe, describe_error(exc))
        else:
            if rc == 0:
                self._subscriptions.sent(mid, subscribe)
                return
            failed = self._subscriptions.send_failed(subscribe, paho.error_string(rc))
        for r in failed:
            self._count("subscriptions_refused")
            log.error("subscription refused: filter %r qos %d: %s", r.topic_filter, r.requested_qos, r.reason)

    # -- helpers -----------------------------------------------------------------------------------

    def _granted(self) -> bool:
        return self._connected and not self._no_sharing and self._subscriptions.all_granted

    def _connect_failed(self, reason: str) -> None:
        with self._lock:
            self._stats["connect_failures"] += 1
        self._failures.failed(reason)

    def _metric(self, name: str, *args: Any) -> None:
        """Tell the metrics, if any; metrics never break the connection."""
        if self._metrics is None:
            return
        try:
            getattr(self._metrics, name)(*args)
        except Exception as exc:  # noqa: BLE001
            log.error("metrics %s failed: %s", name, describe_error(exc))

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1


def _writes_after_the_round(*_: Any) -> None:
    """paho's write-registration hook: a no-op, since the loop writes after every round (and with
    no hook paho would write inline, from inside whatever call queued the packet)."""
