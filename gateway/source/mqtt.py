"""The MQTT source: paho-mqtt behind one adapter, driven by our own network loop thread.

Why our own loop (paho's public loop_read / loop_write / loop_misc / socket / want_write under a
select) instead of loop_start: backpressure. While the pipeline's backlog is full we stop reading,
so QoS 1 messages stay with the broker (its in-flight window bounds what it sends while we send no
acks), yet we keep writing acks and PINGREQs. paho closes the link itself only when a PINGREQ is
outstanding and nothing at all was read for a whole keepalive (`_check_keepalive` re-arms the ping
whenever bytes arrived), so while paused we read one packet every keepalive/4 s: at most four
messages per keepalive slip past the backlog bound, and a slow Kinesis never starves the keepalive
(docs/delivery.md#backpressure).

Why a read interval (`read_interval_s`, MQTT_READ_INTERVAL_MS): at low rates a message wakes an
idle process, and that wake-up costs several times the work the message needs. Once a read has
drained the socket, the next read waits for the interval, so a trickle is handled a few times a
second in small groups; acks queued meanwhile wait for that round unless the loop sleeps longer.
A busy socket is never paced (a read that stops at its packet budget reads again at once), nor is
any read while more than _PACE_BELOW_RATE messages a second arrive.

Invariants held here:
- paho types never leave this module: every PUBLISH becomes a `Message` at once.
- every paho call that touches the connection runs on the loop thread; other threads only queue
  work (acks, subscription changes) and wake the loop. The one exception is `publish()`, which
  paho supports from other threads (it queues and calls our write-registration hook to wake us).
- an exception in a callback is logged in one line and counted, never raised into paho, because
  it would kill the loop thread silently (docs/delivery.md#callbacks-never-block-or-raise); if the thread dies anyway,
  `alive` turns False and `on_fatal` is told.
- an ack owed to an earlier connection never goes out on a new one (AckTracker generations plus
  clearing our own ack queue on every connection change).
"""

from __future__ import annotations

import logging
import random
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.model import Message, now_ms
from gateway.source.acks import AckTracker, Ticket
from gateway.source.connect import MqttConfig, MqttSourceError, build_client, describe_error
from gateway.source.fastpath import BufferedClient
from gateway.source.subscriptions import SubscriptionBook

__all__ = ["MqttConfig", "MqttSource", "MqttSourceError"]

log = logging.getLogger(__name__)

_BURST_PACKETS = 64          # packets read per wake-up while not paused, before selecting again
_PACE_BELOW_RATE = 1000      # msg/s under which reads of a drained socket are paced
_PAUSED_POLL_S = 0.05        # how often a paused loop re-checks the backlog


def _publish_properties(properties: Any) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """(user properties, content type) of a PUBLISH: MQTT 5 only (paho gives None on 3.1.1), and
    paho sets an attribute only for a property the packet carries."""
    if properties is None:
        return (), None
    user_properties = getattr(properties, "UserProperty", None)
    return (tuple(user_properties) if user_properties else ()), getattr(properties, "ContentType", None)


class MqttSource:
    """One broker connection: intake of messages, ordered acks, subscriptions, backpressure."""

    def __init__(self, config: MqttConfig, intake: Callable[[Message, int, int], None], *,
                 backlog_full: Callable[[], bool] | None = None,
                 on_acked: Callable[[Sequence[Ticket]], None] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 paused_read_packets: int = 1,
                 metrics: Any = None,
                 client_factory: Callable[..., Any] = BufferedClient) -> None:
        """`intake(message, mid, qos)` runs on the loop thread for every PUBLISH, in arrival order;
        it must call `self.acks.arrived(mid, qos, parts)` exactly once and must not block.
        `backlog_full()` is polled by the loop; while True, reading stops (see module docstring).
        `metrics` (optional, gateway.ops.metrics.Metrics) is told about connection state,
        subscription grants, lost sessions and callback errors.
        """
        self.config = config
        self._intake = intake
        self._backlog_full = backlog_full
        self._after_read: Callable[[], None] | None = None
        self._on_fatal = on_fatal
        self._metrics = metrics
        self._paused_read_packets = max(1, paused_read_packets)
        self.acks = AckTracker(self.ack, on_done=on_acked)
        self.subscriptions = SubscriptionBook(config.share_group)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._ack_out: deque[tuple[int, int]] = deque()
        self._ack_wake_sent = False   # one wake-up per drain of _ack_out, not one per ack
        self._round_due = 0.0         # when the loop's current select returns at the latest
        self._pub_callbacks: dict[int, Callable[[bool, str], None]] = {}
        self._pub_early: dict[int, tuple[bool, str]] = {}
        self._publishing = 0
        self._paused = False
        self._intake_stopped = False
        self._intake_quiet = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_ident: int | None = None
        self._dead = False
        self._connected = False
        self._session_present: bool | None = None
        self._ever_connected = False
        self._connected_at = 0.0
        self._attempt = 0
        self._last_error = ""
        self._next_paused_read = 0.0
        self._next_read = 0.0
        self._slow = True             # the message rate is below _PACE_BELOW_RATE (see _pace)
        self._rate_since = 0.0
        self._rate_base = 0
        self._received = 0
        self._stats = dict.fromkeys(("connects", "connect_failures", "disconnects", "session_lost",
                                     "callback_errors", "loop_errors", "invalid_topic",
                                     "subscriptions_refused"), 0)
        client = self._client = build_client(config, client_factory)   # may raise: no fds yet
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        client.on_connect = self._cb(self._on_connect)
        client.on_disconnect = self._cb(self._on_disconnect)
        client.on_message = self._cb(self._on_message)
        client.on_subscribe = self._cb(self._on_subscribe)
        client.on_unsubscribe = self._cb(self._on_unsubscribe)
        client.on_publish = self._cb(self._on_publish)
        client.on_socket_register_write = self._cb(lambda *_: self._wake_from_elsewhere())

    # ---------------------------------------------------------------- public surface

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def session_present(self) -> bool | None:
        """What the last successful CONNACK said (None before the first one)."""
        return self._session_present

    @property
    def alive(self) -> bool:
        """The loop thread runs (False before start, after stop, or after it died)."""
        return not self._dead and self._thread is not None and self._thread.is_alive()

    @property
    def subscriptions_granted(self) -> bool:
        return self._connected and self.subscriptions.all_granted

    @property
    def paused(self) -> bool:
        return self._paused or (self._backlog_full is not None and bool(self._backlog_full()))

    def stats(self) -> dict[str, int]:
        """Counters for metrics and tests (connect failures, session losses, callback errors...)."""
        with self._lock:
            return dict(self._stats)

    def start(self) -> None:
        """Start the loop thread; it connects (and reconnects) on its own, forever."""
        if self._thread is not None:
            raise RuntimeError("MqttSource already started")
        self._thread = threading.Thread(target=self._run, name="mqtt-source", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Flush queued acks, disconnect cleanly (the session stays), join; True if it ended."""
        self._stop.set()
        self._wake()
        if self._thread is None:
            self._wake_r.close()
            self._wake_w.close()
            return True
        if threading.get_ident() == self._thread_ident:
            return False          # called from a callback: the loop ends after this round
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def wait_connected(self, timeout: float) -> bool:
        return self._wait_for(lambda: self._connected, timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """Until every wanted subscription is granted, or one is refused (then False)."""
        self._wait_for(lambda: self.subscriptions_granted or bool(self.subscriptions.refused), timeout)
        return self.subscriptions_granted

    def set_subscriptions(self, subscriptions: Iterable[tuple[str, int]]) -> None:
        """Replace the wanted set; applied as a diff on the live connection, in full on each connect."""
        self.subscriptions.set_desired(subscriptions)
        self._wake()

    def set_ack_tracker(self, tracker: AckTracker) -> None:
        """Use a tracker built outside (its send_ack must be `self.ack`); call before start()."""
        self.acks = tracker

    def set_after_read(self, after_read: Callable[[], None] | None) -> None:
        """Called on the loop thread after every read round that may have taken in messages
        (the pipeline hands its records to the sink there, in bulk); call before start()."""
        self._after_read = after_read

    def set_backlog_full(self, backlog_full: Callable[[], bool] | None) -> None:
        self._backlog_full = backlog_full
        self._wake()

    def backlog_freed(self) -> None:
        """The backlog that paused reading has room again: read now, not at the next poll."""
        self._wake()

    def pause(self) -> None:
        self._paused = True

    def stop_intake(self, timeout: float = 2.0) -> None:
        """Read nothing more, not even the bounded keepalive reads of a pause: for the drain at
        shutdown, so every message taken in is one the drain waits for. Acks still go out.
        Returns once the loop thread has finished the round it was in (a message it was reading
        has reached the sink by then)."""
        self._paused = True
        self._intake_stopped = True
        self._wake()
        thread = self._thread
        if thread is not None and thread.is_alive() and threading.get_ident() != self._thread_ident:
            self._intake_quiet.wait(timeout)

    def resume(self) -> None:
        self._paused = False
        self._wake()

    def ack(self, mid: int, qos: int) -> None:
        """Queue an ack for the loop thread (AckTracker calls this, under its lock: never blocks)."""
        self._ack_out.append((mid, qos))
        if self._ack_wake_sent or threading.get_ident() == self._thread_ident:
            return
        if self._round_due - time.monotonic() <= self.config.read_interval_s:
            return   # the loop's next round comes about as soon as a wake-up would make it
        self._ack_wake_sent = True
        self._wake()

    def publish(self, topic: str, payload: bytes, qos: int = 1,
                on_delivered: Callable[[bool, str], None] | None = None) -> paho.MQTTMessageInfo:
        """Publish (the MQTT dead-letter path). `on_delivered(ok, reason)` runs on the loop thread
        when the broker acknowledged it (QoS 1/2) or it was written (QoS 0); keep it quick."""
        with self._lock:
            self._publishing += 1
        try:
            info = self._client.publish(topic, payload, qos)
        except BaseException:
            with self._lock:
                self._publishing -= 1
            raise
        early = None
        with self._lock:
            self._publishing -= 1
            if on_delivered is not None:
                early = self._pub_early.pop(info.mid, None)
                if early is None:
                    self._pub_callbacks[info.mid] = on_delivered
            if self._publishing == 0:
                self._pub_early.clear()
        if early is not None and on_delivered is not None:
            self._guarded("on_delivered", on_delivered, *early)
        return info

    def publish_dead_letter(self, topic: str, payload: bytes, done: Callable[[bool], None]) -> None:
        """QoS 1 publish for the pipeline's MQTT dead letters; `done(ok)` once the broker answered.

        Queued by paho while disconnected and resent after reconnect; a publish paho refuses at
        once (bad topic, queue full) is reported as `done(False)`.
        """
        try:
            info = self.publish(topic, payload, 1, on_delivered=lambda ok, _reason: done(ok))
        except (ValueError, TypeError) as exc:
            log.error("dead letter publish to %r refused: %s", topic, describe_error(exc))
            done(False)
            return
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            with self._lock:
                dropped = self._pub_callbacks.pop(info.mid, None) is not None
            if dropped:
                log.error("dead letter publish to %r refused: %s", topic, paho.error_string(info.rc))
                done(False)

    # ---------------------------------------------------------------- callbacks (loop thread)

    def _cb(self, fn: Callable[..., None]) -> Callable[..., None]:
        name = fn.__name__.lstrip("_")

        def guarded(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - never let paho's loop thread die
                self._callback_failed(name, exc)
        return guarded

    def _guarded(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - never let paho's loop thread die
            self._callback_failed(name, exc)

    def _callback_failed(self, name: str, exc: Exception) -> None:
        self._count("callback_errors")
        log.error("error in MQTT %s callback: %s", name, describe_error(exc))
        self._metric("callback_error")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._connect_failed(f"broker refused the connection: {reason}")
            return
        self.acks.new_connection()     # before anything else: old-connection acks die here
        self._ack_out.clear()
        self._ack_wake_sent = False
        self.subscriptions.new_connection()
        session_present = bool(flags.session_present)
        with self._lock:
            expected = self._ever_connected and self.config.persistent
            self._connected, self._ever_connected = True, True
            self._session_present = session_present
            self._connected_at = time.monotonic()
            self._last_error = ""
            self._stats["connects"] += 1
            if expected and not session_present:
                self._stats["session_lost"] += 1
            self._changed.notify_all()
        log.info("connected to MQTT broker %s:%d as %r (session_present=%s)", self.config.host,
                 self.config.port, self.config.client_id, session_present)
        self._metric("set_connected", True)
        if expected and not session_present:
            log.warning("broker session lost; messages queued while disconnected may be gone")
            self._metric("session_lost")
        self._apply_subscriptions()
        self._metric("set_subscriptions_granted", self.subscriptions_granted)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._ack_out.clear()
        self._ack_wake_sent = False
        with self._lock:
            was, self._connected = self._connected, False
            if was:
                self._stats["disconnects"] += 1
            self._changed.notify_all()
        self._metric("set_connected", False)
        if was:
            level = logging.INFO if self._stop.is_set() else logging.WARNING
            log.log(level, "disconnected from MQTT broker: %s", reason)
        elif not self._stop.is_set():
            # Closed before CONNACK: the classic cause is a TLS mismatch (plain MQTT to a TLS
            # listener, or TLS to a plain one); a broker at its connection limit does it too.
            self._connect_failed(f"connection closed before CONNACK ({reason}); check MQTT_TLS and "
                                 f"MQTT_PORT: a TLS listener drops plain MQTT and a plain one drops TLS")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._received += 1
        mid, qos = msg.mid, msg.qos
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._count("invalid_topic")
            log.warning("message mid %d has a topic that is not valid UTF-8; acknowledged and dropped", mid)
            self.acks.arrived(mid, qos, 0)
            return
        user_properties, content_type = _publish_properties(msg.properties)
        self._intake(Message(topic=topic, payload=bytes(msg.payload), qos=qos, received_ms=now_ms(),
                             retain=bool(msg.retain), user_properties=user_properties,
                             content_type=content_type), mid, qos)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        results = self.subscriptions.suback(mid, [(int(rc.value), str(rc)) for rc in codes])
        for r in results:
            if r.refused:
                self._count("subscriptions_refused")
                log.error("subscription refused: filter %r qos %d: %s", r.topic_filter,
                          r.requested_qos, r.reason)
            else:
                log.info("subscribed: filter %r granted qos %d", r.topic_filter, r.granted_qos)
        with self._lock:
            self._changed.notify_all()
        self._metric("set_subscriptions_granted", self.subscriptions_granted)

    def _on_unsubscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        for rc in codes or ():
            if rc.is_failure:
                log.warning("unsubscribe (mid %d) answered: %s", mid, rc)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        ok = not reason.is_failure
        with self._lock:
            callback = self._pub_callbacks.pop(mid, None)
            if callback is None and self._publishing:
                self._pub_early[mid] = (ok, str(reason))
        if callback is not None:
            callback(ok, str(reason))

    # ---------------------------------------------------------------- loop thread

    def _run(self) -> None:
        self._thread_ident = threading.get_ident()
        try:
            while not self._stop.is_set():
                try:
                    self._run_once()
                except Exception as exc:  # noqa: BLE001 - a bug must not end the loop; back off
                    self._count("loop_errors")
                    log.error("error in MQTT network loop: %s", describe_error(exc))
                    self._stop.wait(self._next_delay())
            self._shutdown()
        except BaseException as exc:  # noqa: BLE001 - reported through alive/on_fatal, not a traceback
            self._dead = True
            log.critical("MQTT network loop died: %s", describe_error(exc))
            if self._on_fatal is not None:
                self._guarded("on_fatal", self._on_fatal, exc)
        finally:
            self._connected = False
            self._wake_r.close()
            self._wake_w.close()

    def _run_once(self) -> None:
        if self._intake_stopped:
            self._intake_quiet.set()   # the previous round, and its reads, are over
        if self._client.socket() is None:
            if not self._connect_once():
                self._stop.wait(self._next_delay())
            return
        self._iterate()
        if self._client.socket() is None and not self._stop.is_set():
            self._stop.wait(self._next_delay())

    def _connect_once(self) -> bool:
        try:
            rc = self._client.reconnect()
        except Exception as exc:  # noqa: BLE001 - refused, DNS, TLS, websocket handshake...
            self._connect_failed(describe_error(exc))
            return False
        if rc != 0:
            self._connect_failed(paho.error_string(rc))
            return False
        return True

    def _connect_failed(self, reason: str) -> None:
        with self._lock:
            self._stats["connect_failures"] += 1
            repeated, self._last_error = reason == self._last_error, reason
        if not repeated:
            log.error("cannot connect to MQTT broker %s:%d: %s (retrying with backoff)",
                      self.config.host, self.config.port, reason)

    def _next_delay(self) -> float:
        """Capped exponential backoff with full jitter above the floor; resets after a stable link."""
        c = self.config
        if self._connected_at and time.monotonic() - self._connected_at >= c.reconnect_max_s:
            self._attempt = 0
        self._connected_at = 0.0
        cap = min(c.reconnect_max_s, c.reconnect_min_s * 2 ** min(self._attempt, 30))
        self._attempt += 1
        return random.uniform(c.reconnect_min_s, cap)

    def _iterate(self, max_wait: float = 1.0) -> None:
        """One select round: service queued work, read (unless paused), write, keepalive."""
        client = self._client
        sock = client.socket()
        if sock is None:
            return
        now = time.monotonic()
        paused = self._connected and self.paused     # CONNACK is always read at once
        may_read = not self._intake_stopped and (not paused or now >= self._next_paused_read)
        pacing = may_read and not paused and now < self._next_read
        if pacing:
            may_read = False
        buffered = may_read and self._buffered(client, sock)
        rlist: list[Any] = [self._wake_r, sock] if may_read else [self._wake_r]
        timeout = 0.0 if buffered else min(max_wait, self._keepalive() / 4)
        if paused:
            timeout = min(timeout, _PAUSED_POLL_S)
        if pacing:
            timeout = min(timeout, self._next_read - now)
        # Publish the deadline before looking at the ack queue: an ack queued after this line
        # sees it (and wakes us if it is far), one queued before it is seen here.
        self._round_due = now + timeout
        wants_write = client.want_write() or (self._connected and bool(self._ack_out))
        readable, _, _ = select.select(rlist, [sock] if wants_write else [], [], timeout)
        self._round_due = 0.0
        if self._wake_r in readable:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        self._service()
        if buffered or sock in readable:
            self._read(paused)
        if client.socket() is not None:
            self._flush_acks()
            if client.want_write():
                client.loop_write()
        if client.socket() is not None:
            client.loop_misc()

    def _pace(self) -> None:
        """After a drained read, wait out the read interval, but only while the rate is low: a QoS 1
        stream is bounded by Receive Maximum per round trip, and pacing would lengthen the trip."""
        now = time.monotonic()
        elapsed = now - self._rate_since
        count = self._received - self._rate_base
        if count >= _PACE_BELOW_RATE * max(elapsed, self.config.read_interval_s):
            self._slow = False           # a burst shows at once...
            self._rate_since, self._rate_base = now, self._received
        elif elapsed >= 1.0:
            self._slow = True            # ...its end after a second below the rate
            self._rate_since, self._rate_base = now, self._received
        if self._slow:
            self._next_read = now + self.config.read_interval_s

    @staticmethod
    def _buffered(client: Any, sock: Any) -> bool:
        """Bytes already taken off the socket (by BufferedClient, or inside TLS) wait to be parsed."""
        in_client = getattr(client, "buffered", None)
        if in_client is not None and in_client() > 0:
            return True
        in_tls = getattr(sock, "pending", None)
        return in_tls is not None and in_tls() > 0

    def _read(self, paused: bool) -> None:
        try:
            self._read_packets(paused)
        finally:
            if self._after_read is not None:
                self._guarded("after_read", self._after_read)

    def _read_packets(self, paused: bool) -> None:
        client = self._client
        if paused:      # just enough to keep paho's keepalive happy; the rest waits in the socket
            self._next_paused_read = time.monotonic() + self._keepalive() / 4
            for _ in range(self._paused_read_packets):
                if client.loop_read() != 0 or client.socket() is None:
                    return
            return
        for _ in range(_BURST_PACKETS):
            before = self._received
            if client.loop_read() != 0 or client.socket() is None:
                return
            if self._received == before:       # drained: what the broker sent is all read
                self._pace()
                return
            if self.paused:
                return

    def _keepalive(self) -> float:
        """The keepalive in force: a v5 broker may impose its own (Server Keep Alive)."""
        value = getattr(self._client, "keepalive", None)
        return float(value) if isinstance(value, (int, float)) and value > 0 else self.config.keepalive_s

    def _service(self) -> None:
        if not self._connected:
            return
        self._flush_acks()
        if self.subscriptions.dirty:
            self._apply_subscriptions()
            self._metric("set_subscriptions_granted", self.subscriptions_granted)

    def _flush_acks(self) -> None:
        if not self._connected:
            return
        self._ack_wake_sent = False   # before draining: an ack appended from now on wakes us again
        ack_out, client = self._ack_out, self._client
        while ack_out:
            mid, qos = ack_out.popleft()
            client.ack(mid, qos)

    def _apply_subscriptions(self) -> None:
        subscribe, unsubscribe = self.subscriptions.plan()
        client, v5 = self._client, self.config.protocol == "5"
        if subscribe:
            self._subscribe(client, v5, subscribe)
        # Unsubscribe only after the new filters are asked for: a reload that swaps a/+ for a/#
        # must leave no moment in which the broker has neither (it would not queue the message).
        if unsubscribe:
            client.unsubscribe(unsubscribe)
            log.info("unsubscribed: %s", ", ".join(repr(f) for f in unsubscribe))

    def _subscribe(self, client: Any, v5: bool, subscribe: list[tuple[str, int]]) -> None:
        if v5:   # retain handling 1: resubscribing on reconnect does not resend retained messages
            shared = bool(self.config.share_group)
            request: list[Any] = [(f, SubscribeOptions(qos=q, noLocal=not shared,
                                   retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB))
                                  for f, q in subscribe]
        else:
            request = list(subscribe)
        try:
            rc, mid = client.subscribe(request)
        except ValueError as exc:
            failed = self.subscriptions.send_failed(subscribe, describe_error(exc))
        else:
            if rc == 0:
                self.subscriptions.sent(mid, subscribe)
                return
            failed = self.subscriptions.send_failed(subscribe, paho.error_string(rc))
        for r in failed:
            self._count("subscriptions_refused")
            log.error("subscription refused: filter %r qos %d: %s", r.topic_filter,
                      r.requested_qos, r.reason)

    def _shutdown(self) -> None:
        """Let already-released acks out, send DISCONNECT, close. The session stays at the broker."""
        client = self._client
        if client.socket() is None:
            return
        self._flush_acks()
        client.disconnect()
        deadline = time.monotonic() + 2.0
        while client.socket() is not None and client.want_write() and time.monotonic() < deadline:
            sock = client.socket()
            select.select([], [sock], [], 0.1)
            client.loop_write()
        sock = client.socket()
        if sock is not None:
            sock.close()

    # ---------------------------------------------------------------- helpers

    def _wake_from_elsewhere(self) -> None:
        """Wake the loop for a write queued by another thread; the loop writes after every round."""
        if threading.get_ident() != self._thread_ident:
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def _metric(self, name: str, *args: Any) -> None:
        """Tell the metrics object, if any; metrics never break the connection."""
        fn = getattr(self._metrics, name, None)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001
            log.error("metrics %s failed: %s", name, describe_error(exc))

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1
