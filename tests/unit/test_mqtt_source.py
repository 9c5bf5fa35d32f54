"""MqttSource against a scripted fake paho client: no broker, no network, no sleeps.

The fake records what the source asked paho to do and lets the test fire paho's callbacks
(CONNACK, PUBLISH, SUBACK, disconnect) the way paho does inside the loop's reads. Loop-level tests
drive one round at a time with `step()` and move an injected clock instead of waiting.
"""

from __future__ import annotations

import itertools
import logging
import os
import resource
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from paho.mqtt.client import ConnectFlags, DisconnectFlags, MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.model import Message
from gateway.settings.settings import MqttConfig, load_settings
from gateway.source.acks import AckTracker, Ticket
from gateway.source.loop import NetworkLoopError
from gateway.source.mqtt import MqttSource, MqttSourceError
from gateway.source.outbound import Outbound
from gateway.source.subscriptions import SubscriptionBook

_DOCUMENTED = load_settings({"MQTT_HOST": "127.0.0.1", "MQTT_CLIENT_ID": "gw-1", "GATEWAY_ROUTES": "routes.yaml"}).mqtt


def config(**changes: Any) -> MqttConfig:
    """The documented defaults, persistent, without pacing unless a test asks for it."""
    return replace(_DOCUMENTED, **{"persistent": True, "read_interval_s": 0.0, **changes})


class Boom(BaseException):
    """Something a callback guard must not swallow (stands in for a paho bug killing the loop)."""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeClient:
    """Just enough of paho.mqtt.client.Client for MqttSource; `out` is what would hit the wire."""

    def __init__(self, api: Any, **kwargs: Any) -> None:
        self.api, self.kwargs = api, kwargs
        self.calls: dict[str, Any] = {}
        self.out: list[tuple[Any, ...]] = []
        self.wire: list[tuple[Any, ...]] = []
        self.sock: socket.socket | None = None
        self.peer: socket.socket | None = None
        self._mids = itertools.count(1)
        self.reads = 0
        self.inbox: list[tuple[bytes, bytes, int]] = []     # PUBLISHes the next reads deliver
        self.read_error: Exception | None = None
        self.reconnect_error: BaseException | None = None
        self.reconnects: list[float] = []
        self.clock: Clock | None = None
        self.high_fd: int | None = None
        self.socket_error: BaseException | None = None
        self.socket_touched = threading.Event()
        self.on_publish: Any = None
        self.options: dict[int, list[Any]] = {}     # SUBSCRIBE mid -> the options of each filter
        self.identifiers: dict[int, int] = {}       # SUBSCRIBE mid -> its subscription identifier
        self.broker_closes = True                   # the broker closes its end on DISCONNECT

    # configuration ---------------------------------------------------------------------------
    def enable_logger(self, logger: Any) -> None:
        self.calls["enable_logger"] = logger

    def ws_set_options(self, path: str) -> None:
        self.calls["ws_set_options"] = path

    def tls_set(self, **kwargs: Any) -> None:
        if kwargs.get("ca_certs") == "missing.pem":
            raise FileNotFoundError(2, "No such file or directory")
        self.calls["tls_set"] = kwargs

    def tls_set_context(self, context: Any) -> None:
        self.calls["tls_set_context"] = context

    def tls_insecure_set(self, value: bool) -> None:
        self.calls["tls_insecure_set"] = value

    def username_pw_set(self, username: str, password: str | None) -> None:
        self.calls["username_pw_set"] = (username, password)

    def connect_async(self, host: str, port: int, keepalive: int, **kwargs: Any) -> None:
        self.calls["connect_async"] = (host, port, keepalive, kwargs)

    # network ---------------------------------------------------------------------------------
    def reconnect(self) -> int:
        if self.clock is not None:
            self.reconnects.append(self.clock())
        if self.reconnect_error is not None:
            raise self.reconnect_error
        self.sock, self.peer = socket.socketpair()
        if self.high_fd is not None:       # the same socket, behind a file descriptor >= 1024
            os.dup2(self.sock.fileno(), self.high_fd)
            self.sock.close()
            self.sock = socket.socket(fileno=self.high_fd)
        return 0

    def socket(self) -> socket.socket | None:
        if self.socket_error is not None:
            self.socket_touched.set()
            raise self.socket_error
        return self.sock

    def want_write(self) -> bool:
        return bool(self.out)

    def loop_read(self) -> int:
        self.reads += 1
        if self.read_error is not None:
            raise self.read_error
        if self.inbox:
            self.fire_message(*self.inbox.pop(0))
        return 0

    def loop_write(self) -> int:
        self.wire.extend(self.out)
        self.out.clear()
        return 0

    def loop_misc(self) -> int:
        return 0

    def ack(self, mid: int, qos: int) -> int:
        self.out.append(("ack", mid, qos))
        return 0

    def subscribe(self, request: list[tuple[str, Any]], properties: Any = None) -> tuple[int, int]:
        mid = next(self._mids)
        qos = [opt if isinstance(opt, int) else opt.QoS for _, opt in request]
        self.out.append(("subscribe", mid, [(f, q) for (f, _), q in zip(request, qos, strict=True)]))
        self.options[mid] = [opt for _, opt in request]
        if properties is not None and hasattr(properties, "SubscriptionIdentifier"):
            self.identifiers[mid] = properties.SubscriptionIdentifier[0]
        return 0, mid

    def unsubscribe(self, filters: list[str]) -> tuple[int, int]:
        mid = next(self._mids)
        self.out.append(("unsubscribe", mid, list(filters)))
        return 0, mid

    def publish(self, topic: str, payload: bytes, qos: int) -> MQTTMessageInfo:
        if "+" in topic or "#" in topic:
            raise ValueError("Publish topic cannot contain wildcards.")
        info = MQTTMessageInfo(next(self._mids))
        self.out.append(("publish", info.mid, topic, payload, qos))
        if topic == "puback/before/return":          # PUBACK handled before publish() returned
            self.on_publish(self, None, info.mid, ReasonCode(PacketTypes.PUBACK, identifier=0), None)
        return info

    def disconnect(self) -> int:
        self.out.append(("disconnect",))
        if self.sock is not None:              # paho writes DISCONNECT and closes its socket
            self.sock.close()
            self.sock = None
        if self.broker_closes and self.peer is not None:
            self.peer.close()
        return 0

    # paho's reads, scripted --------------------------------------------------------------------
    def fire_connect(self, session_present: bool = False, rc: int = 0, **properties: Any) -> None:
        """CONNACK; keyword arguments are MQTT 5 CONNACK properties (SharedSubscriptionAvailable=0...)."""
        if self.sock is None:
            self.reconnect()
        props = None
        if properties:
            props = Properties(PacketTypes.CONNACK)
            for name, value in properties.items():
                setattr(props, name, value)
        self.on_connect(self, None, ConnectFlags(session_present),
                        ReasonCode(PacketTypes.CONNACK, identifier=rc), props)

    def fire_disconnect(self) -> None:
        self.sock = None
        self.on_disconnect(self, None, DisconnectFlags(False),
                           ReasonCode(PacketTypes.DISCONNECT, identifier=0x80), None)

    def fire_message(self, topic: bytes, payload: bytes, mid: int, qos: int = 1, *, retain: bool = False,
                     identifiers: list[int] | None = None) -> None:
        msg = MQTTMessage(mid, topic)
        msg.payload, msg.qos, msg.retain = payload, qos, retain
        if identifiers:
            msg.properties = Properties(PacketTypes.PUBLISH)
            msg.properties.SubscriptionIdentifier = identifiers
        self.on_message(self, None, msg)

    def fire_suback(self, mid: int, codes: list[int]) -> None:
        self.on_subscribe(self, None, mid, [ReasonCode(PacketTypes.SUBACK, identifier=c) for c in codes], None)

    def make_readable(self) -> None:
        """Bytes wait in the socket (the fake's reads never consume them)."""
        assert self.peer is not None
        self.peer.sendall(b"pending publishes")

    def sent(self, kind: str) -> list[tuple[Any, ...]]:
        return [p for p in self.out + self.wire if p[0] == kind]

    def close(self) -> None:
        for s in (self.sock, self.peer):
            if s is not None:
                s.close()


class Pipeline:
    """The source's hooks: one part per message, tickets kept for the test to settle."""

    def __init__(self, acks: AckTracker, fail: bool = False) -> None:
        self.acks, self.fail = acks, fail
        self.messages: list[Message] = []
        self.tickets: list[Ticket] = []
        self.rounds: list[int] = []
        self.sent_now = 0
        self.full = False
        self.client: FakeClient | None = None

    def intake(self, message: Message, mid: int, qos: int) -> None:
        if self.fail:
            raise RuntimeError("router bug")
        self.messages.append(message)
        self.tickets.append(self.acks.arrived(mid, qos, 1))

    def after_read(self) -> None:
        self.rounds.append(self.client.reads if self.client is not None else -1)

    def send_now(self) -> None:
        self.sent_now += 1

    def backlog_full(self) -> bool:
        return self.full


class Made:
    def __init__(self, source: MqttSource, client: FakeClient, pipeline: Pipeline, outbound: Outbound,
                 clock: Clock) -> None:
        self.source, self.client, self.pipeline, self.outbound, self.clock = source, client, pipeline, outbound, clock


@pytest.fixture
def fake() -> Iterator[Callable[..., Made]]:
    made: list[Made] = []

    def _make(cfg: MqttConfig | None = None, *, fail: bool = False, **kwargs: Any) -> Made:
        clock = Clock()
        outbound = Outbound(clock=clock)
        acks = AckTracker(outbound)
        pipeline = Pipeline(acks, fail=fail)
        clients: list[FakeClient] = []

        def factory(*args: Any, **kw: Any) -> FakeClient:
            clients.append(FakeClient(*args, **kw))
            return clients[-1]

        source = MqttSource(cfg or config(), hooks=pipeline, acks=acks, outbound=outbound,
                            client_factory=factory, clock=clock, **kwargs)
        client = clients[0]
        client.clock, pipeline.client = clock, client
        result = Made(source, client, pipeline, outbound, clock)
        made.append(result)
        return result

    yield _make
    for m in made:
        m.source.stop(0)
        m.client.close()
        m.outbound.close()


# --- connection options ---------------------------------------------------------------------


def test_v5_persistent_session_connects_without_clean_start(fake: Any) -> None:
    client = fake(config(client_id="gw", session_expiry_s=600, receive_maximum=50)).client
    assert client.kwargs["protocol"] == MQTTProtocolVersion.MQTTv5
    assert client.kwargs["manual_ack"] is True and "clean_session" not in client.kwargs
    _, _, _, kwargs = client.calls["connect_async"]
    assert kwargs["clean_start"] is False
    assert kwargs["properties"].SessionExpiryInterval == 600
    assert kwargs["properties"].ReceiveMaximum == 50


def test_v311_persistent_session_uses_clean_session_false(fake: Any) -> None:
    client = fake(config(client_id="gw", protocol="3.1.1", keepalive_s=7)).client
    assert client.kwargs["protocol"] == MQTTProtocolVersion.MQTTv311
    assert client.kwargs["clean_session"] is False
    assert client.calls["connect_async"][2] == 7


def test_tls_verifies_certificates_unless_explicitly_insecure(fake: Any) -> None:
    client = fake(config(tls=True, ca_file="ca.pem", cert_file="c.pem", key_file="k.pem")).client
    assert client.calls["tls_set"]["cert_reqs"] == ssl.CERT_REQUIRED
    assert "tls_insecure_set" not in client.calls
    insecure = fake(config(tls=True, tls_insecure=True)).client
    assert insecure.calls["tls_insecure_set"] is True


def test_unreadable_tls_file_is_a_single_line_error(fake: Any) -> None:
    with pytest.raises(MqttSourceError, match="TLS setup failed") as info:
        fake(config(tls=True, ca_file="missing.pem"))
    assert "\n" not in str(info.value)


def test_websockets_transport_and_credentials_are_configured(fake: Any) -> None:
    client = fake(config(transport="websockets", ws_path="/ws", username="u", password="p")).client
    assert client.kwargs["transport"] == "websockets"
    assert client.calls["ws_set_options"] == "/ws"
    assert client.calls["username_pw_set"] == ("u", "p")


def test_undecided_persistence_is_refused_in_one_line(fake: Any) -> None:
    with pytest.raises(MqttSourceError, match="persistent is undecided") as info:
        fake(config(persistent=None))
    assert "\n" not in str(info.value)


# --- subscriptions --------------------------------------------------------------------------


def test_every_connack_resubscribes_the_whole_set(fake: Any) -> None:
    client = fake(subscriptions=[("a/#", 1), ("b/+", 1)]).client
    client.fire_connect()
    client.fire_disconnect()
    client.out.clear()
    client.fire_connect(session_present=True)
    [(_, _, asked)] = client.sent("subscribe")
    assert asked == [("a/#", 1), ("b/+", 1)]


def test_subscription_changes_are_applied_as_a_diff_on_the_live_connection(fake: Any) -> None:
    m = fake(subscriptions=[("a/#", 1), ("b/+", 1), ("c", 1)])
    source, client = m.source, m.client
    client.fire_connect()
    client.fire_suback(1, [1, 1, 1])
    client.out.clear()
    source.update_subscriptions([("b/+", 0), ("c", 1), ("d", 1)])
    source.step()
    # new filters first, then the removed ones: no moment with neither at the broker
    assert client.sent("subscribe") == [("subscribe", 2, [("b/+", 0), ("d", 1)])]
    assert client.sent("unsubscribe") == [("unsubscribe", 3, ["a/#"])]
    assert not source.subscriptions_granted
    client.fire_suback(2, [0, 1])
    assert source.subscriptions_granted
    assert source.subscriptions.status() == {"b/+": "granted qos 0", "c": "granted qos 1",
                                             "d": "granted qos 1"}


def test_share_group_prefixes_every_filter(fake: Any) -> None:
    client = fake(config(share_group="gw"), subscriptions=[("welder/#", 1)]).client
    client.fire_connect()
    assert client.sent("subscribe")[0][2] == [("$share/gw/welder/#", 1)]


def test_refused_subscription_is_reported_not_ignored(fake: Any, caplog: Any) -> None:
    m = fake(subscriptions=[("ok/#", 1), ("secret/#", 1)])
    m.client.fire_connect()
    with caplog.at_level(logging.ERROR, logger="gateway.source.mqtt"):
        m.client.fire_suback(1, [1, 0x87])
    assert not m.source.subscriptions_granted
    assert m.source.subscriptions.status()["secret/#"] == "refused: Not authorized"
    assert m.source.stats()["subscriptions_refused"] == 1
    [line] = [r.getMessage() for r in caplog.records]
    assert "secret/#" in line and "Not authorized" in line


def test_lower_granted_qos_counts_as_refused(fake: Any) -> None:
    m = fake(subscriptions=[("a/#", 1)])
    m.client.fire_connect()
    m.client.fire_suback(1, [0])
    assert not m.source.subscriptions_granted
    assert "lower than requested" in m.source.subscriptions.refused["a/#"]


def test_suback_for_a_superseded_request_is_ignored() -> None:
    book = SubscriptionBook()
    book.set_desired([("a", 1)])
    book.new_connection()
    subscribe, _ = book.plan()
    book.sent(1, subscribe)
    book.set_desired([("a", 0)])
    book.sent(2, book.plan()[0])
    assert book.suback(1, [(0x80, "Unspecified error")]) == []
    assert book.suback(2, [(0, "Granted QoS 0")])[0].granted_qos == 0
    assert book.all_granted


# --- messages and acks ----------------------------------------------------------------------


def test_message_becomes_a_gateway_message_and_is_acked_in_order(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    m.client.fire_message(b"t/1", b"one", mid=1)
    m.client.fire_message(b"t/2", b"two", mid=2)
    first, _second = m.pipeline.messages
    assert isinstance(first, Message) and first.topic == "t/1" and first.payload == b"one"
    assert first.qos == 1 and first.received_ms > 0
    m.pipeline.acks.settle([m.pipeline.tickets[1]])
    m.source.step()
    assert m.client.sent("ack") == []
    m.pipeline.acks.settle([m.pipeline.tickets[0]])
    m.source.step()
    assert m.client.sent("ack") == [("ack", 1, 1), ("ack", 2, 1)]


def test_retain_flag_and_mqtt5_properties_travel_in_the_message(fake: Any) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    made = fake()
    client, pipeline = made.client, made.pipeline
    client.fire_connect()
    msg = MQTTMessage(1, b"t/1")
    msg.payload, msg.qos, msg.retain = b"{}", 1, True
    msg.properties = Properties(PacketTypes.PUBLISH)
    msg.properties.UserProperty = ("site", "plant-7")
    msg.properties.UserProperty = ("site", "plant-8")
    msg.properties.ContentType = "application/json"
    client.on_message(client, None, msg)
    bare = MQTTMessage(2, b"t/2")        # MQTT 3.1.1: no properties at all
    bare.payload, bare.qos = b"{}", 1
    client.on_message(client, None, bare)
    v5, v311 = pipeline.messages
    assert v5.retain is True and v5.content_type == "application/json"
    assert v5.user_properties == (("site", "plant-7"), ("site", "plant-8"))
    assert (v311.retain, v311.user_properties, v311.content_type) == (False, (), None)


def test_topic_that_is_not_utf8_is_acked_and_counted_without_intake(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    m.client.fire_message(b"bad/\xff", b"x", mid=5)
    m.source.step()
    assert m.pipeline.messages == []
    assert m.client.sent("ack") == [("ack", 5, 1)]
    assert m.source.stats()["invalid_topic"] == 1


def test_exception_in_intake_is_logged_and_never_reaches_paho(fake: Any, caplog: Any) -> None:
    m = fake(fail=True)
    m.client.fire_connect()
    with caplog.at_level(logging.ERROR, logger="gateway.source.mqtt"):
        m.client.fire_message(b"t", b"x", mid=1)
    assert m.source.stats()["callback_errors"] == 1
    [record] = caplog.records
    assert "router bug" in record.getMessage() and record.exc_info is None


def test_ack_owed_to_an_earlier_connection_is_never_sent(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    m.client.fire_message(b"t", b"x", mid=1)
    m.client.fire_disconnect()
    m.pipeline.acks.settle(m.pipeline.tickets)        # Kinesis answered while we were disconnected
    m.client.fire_connect(session_present=True)
    m.source.step()
    assert m.client.sent("ack") == []


def test_ack_released_just_before_a_reconnect_is_dropped(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    m.client.fire_message(b"t", b"x", mid=1)
    m.pipeline.acks.settle(m.pipeline.tickets)        # queued for the loop, not yet sent
    m.client.fire_disconnect()
    m.client.fire_connect(session_present=True)
    m.source.step()
    assert m.client.sent("ack") == []


def test_the_tracker_it_was_given_starts_a_generation_per_connection(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    assert m.pipeline.acks.generation == 1


# --- connecting -----------------------------------------------------------------------------


def test_lost_session_on_reconnect_is_warned_and_counted(fake: Any, caplog: Any) -> None:
    m = fake()
    with caplog.at_level(logging.WARNING, logger="gateway.source.mqtt"):
        m.client.fire_connect(session_present=False)          # first start: nothing to lose
        m.client.fire_disconnect()
        m.client.fire_connect(session_present=False)
    warnings = [r.getMessage() for r in caplog.records if "session lost" in r.getMessage()]
    assert warnings == ["broker session lost; messages queued while disconnected may be gone"]
    assert m.source.stats()["session_lost"] == 1 and m.source.session_present is False


def test_refused_connection_is_logged_once_per_reason(fake: Any, caplog: Any) -> None:
    m = fake()
    m.client.reconnect_error = ConnectionRefusedError(111, "Connection refused")
    with caplog.at_level(logging.ERROR, logger="gateway.source.mqtt"):
        m.source.step()
        m.clock.advance(60)                                   # past any backoff
        m.source.step()
        m.client.reconnect_error = None
        m.client.fire_connect(rc=0x86)                        # bad user name or password
    lines = [r.getMessage() for r in caplog.records]
    assert len(m.client.reconnects) == 3
    assert len(lines) == 2 and "connection refused" in lines[0]
    assert "Bad user name or password" in lines[1]
    assert m.source.stats()["connect_failures"] == 3 and not m.source.connected


def test_reconnect_delay_grows_with_jitter_up_to_the_cap(fake: Any) -> None:
    m = fake(config(reconnect_min_s=1, reconnect_max_s=8))
    m.client.reconnect_error = ConnectionRefusedError(111, "Connection refused")
    tick = 0.05
    while len(m.client.reconnects) < 11:
        m.source.step()
        m.clock.advance(tick)
    times = m.client.reconnects
    delays = [later - earlier for earlier, later in itertools.pairwise(times)]
    caps = [1, 2, 4, 8, 8, 8, 8, 8, 8, 8]
    assert all(1 <= d <= cap + tick + 1e-9 for d, cap in zip(delays, caps, strict=True))


# --- publishing -----------------------------------------------------------------------------


def test_publish_reports_delivery_once_even_when_puback_beats_the_return(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    results: list[tuple[bool, str]] = []
    m.outbound.publish("puback/before/return", b"x", 1, lambda ok, r: results.append((ok, r)))
    m.outbound.publish("dead/letter", b"y", 1, lambda ok, r: results.append((ok, r)))
    m.source.step()
    (_, early, *_), (_, later, *_) = m.client.sent("publish")
    m.client.on_publish(m.client, None, later, ReasonCode(PacketTypes.PUBACK, identifier=0x87), None)
    assert results == [(True, "Success"), (False, "Not authorized")]
    for mid in (early, later):                                # answered once: nothing is kept
        m.client.on_publish(m.client, None, mid, ReasonCode(PacketTypes.PUBACK, identifier=0), None)
    assert early != later and len(results) == 2


def test_dead_letter_publish_reports_broker_answer_or_refusal(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    outcomes: list[bool] = []
    m.outbound.publish("dlq/gateway", b"x", 1, lambda ok, _reason: outcomes.append(ok))
    m.source.step()
    [(_, mid, topic, _, qos)] = m.client.sent("publish")
    assert (topic, qos, outcomes) == ("dlq/gateway", 1, [])
    m.client.on_publish(m.client, None, mid, ReasonCode(PacketTypes.PUBACK, identifier=0), None)
    m.outbound.publish("dlq/+", b"x", 1, lambda ok, _reason: outcomes.append(ok))
    m.source.step()
    assert outcomes == [True, False]


# --- the loop's read policy -----------------------------------------------------------------


def test_paused_source_reads_one_packet_per_quarter_keepalive(fake: Any) -> None:
    m = fake(config(keepalive_s=60))
    m.client.fire_connect()
    m.client.make_readable()
    m.pipeline.full = True
    m.source.step()
    assert m.client.reads == 1                              # the first paused round reads one
    m.source.step()
    assert m.client.reads == 1                              # next read only after keepalive/4
    m.clock.advance(15)
    m.source.step()
    assert m.client.reads == 2
    m.pipeline.full = False
    m.outbound.wake()                                       # what the pipeline does when it has room
    m.source.step()
    assert m.client.reads == 3                              # a burst stops when no PUBLISH came in


def test_drained_socket_is_read_again_only_after_the_read_interval(fake: Any) -> None:
    m = fake(config(read_interval_s=60))
    m.client.fire_connect()
    m.client.fire_message(b"t", b"x", mid=4)
    m.client.make_readable()                                # the socket stays readable
    m.source.step()
    assert m.client.reads == 1                              # read until drained...
    m.source.step()
    assert m.client.reads == 1                              # ...then not again within the interval
    m.pipeline.acks.settle(m.pipeline.tickets)
    m.source.step()
    assert ("ack", 4, 1) in m.client.wire                   # acks do not wait for it
    m.clock.advance(60)
    m.source.step()
    assert m.client.reads == 2


def test_a_round_ends_without_another_read_once_the_client_knows_the_socket_is_drained(fake: Any) -> None:
    """BufferedClient.drained(): a short read, all parsed, took all there was; reading again would
    only find nothing, and a broker with a window of one makes every message a round of its own."""
    m = fake(config(read_interval_s=0))
    m.client.fire_connect()
    m.client.make_readable()
    m.client.inbox = [(b"t", b"1", 1), (b"t", b"2", 2)]
    m.source.step()
    assert (m.client.reads, len(m.pipeline.messages)) == (3, 2)   # the third read found nothing
    m.client.drained = lambda: not m.client.inbox                 # type: ignore[attr-defined]
    m.client.inbox = [(b"t", b"3", 3), (b"t", b"4", 4)]
    m.source.step()
    assert (m.client.reads, len(m.pipeline.messages)) == (5, 4)   # no read after the last message
    assert m.pipeline.rounds[-1] == 5


def test_reads_are_not_paced_while_subacks_are_awaited(fake: Any) -> None:
    """One SUBSCRIBE per filter (identifiers): 10,000 routes must not wait a read interval each."""
    m = fake(config(read_interval_s=60), subscriptions=[("t", 1)])
    m.client.fire_connect()
    [(_, mid, _)] = m.client.sent("subscribe")
    m.client.fire_message(b"t", b"x", mid=4, qos=0)
    m.client.make_readable()
    m.source.step()
    m.source.step()
    assert m.client.reads == 2                              # not paced: a SUBACK is awaited
    m.client.fire_suback(mid, [1])
    m.source.step()
    reads = m.client.reads
    m.source.step()
    assert m.client.reads == reads                          # answered: paced again


def test_every_read_round_ends_with_after_read_even_when_reading_fails(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    m.client.make_readable()
    m.source.step()
    m.client.read_error = RuntimeError("paho bug")
    m.source.step()
    assert m.pipeline.rounds == [1, 2]
    assert m.source.stats()["loop_errors"] == 1


def test_reads_are_not_paced_while_messages_arrive_fast(fake: Any) -> None:
    m = fake(config(read_interval_s=0.5))
    m.client.fire_connect()
    m.client.make_readable()
    m.source.step()                                          # a drained read starts the rate count
    m.clock.advance(0.5)
    m.client.inbox = [(b"t", b"x", mid) for mid in range(1, 601)]   # 600 in half a second
    while m.client.inbox:
        m.source.step()
    m.source.step()                                          # the read that finds the socket drained
    reads = m.client.reads
    m.source.step()
    assert m.client.reads == reads + 1                       # no read interval at 1,200 msg/s


def test_a_broker_waiting_for_our_acks_is_not_paced_and_gets_them_at_once(fake: Any) -> None:
    m = fake(config(read_interval_s=60))
    m.client.fire_connect()
    m.client.make_readable()
    m.client.inbox = [(b"t", b"1", 1)]
    m.source.step()                                          # one message held: maybe a trickle
    assert m.pipeline.sent_now == 0
    m.pipeline.acks.settle(m.pipeline.tickets)               # the linger ran out, Kinesis holds it
    m.clock.advance(60)
    m.client.inbox = [(b"t", b"2", 2)]                       # the broker sent the next only now
    m.source.step()
    assert ("ack", 1, 1) in m.client.wire
    assert m.pipeline.sent_now == 1                          # a window of one: send what is held now
    m.pipeline.acks.settle(m.pipeline.tickets[1:])
    m.client.inbox = [(b"t", b"3", 3)]
    reads = m.client.reads
    m.source.step()                                          # no read interval in between
    assert m.client.reads > reads and len(m.pipeline.messages) == 3
    assert m.pipeline.sent_now == 2


def test_a_wide_window_at_a_low_rate_is_still_paced(fake: Any) -> None:
    m = fake(config(read_interval_s=60))
    m.client.fire_connect()
    m.client.make_readable()
    mids = itertools.count(1)
    for arriving in (2, 3, 1, 3, 2, 4):                      # a trickle; each group acked later
        m.pipeline.acks.settle(m.pipeline.tickets)
        m.client.inbox = [(b"t", b"x", next(mids)) for _ in range(arriving)]
        while m.client.inbox:
            m.source.step()
        m.source.step()
        reads = m.client.reads
        m.source.step()
        assert m.client.reads == reads                       # paced: the next read waits
        m.clock.advance(60)
    assert m.pipeline.sent_now == 0


def test_read_interval_zero_reads_whenever_the_socket_is_readable(fake: Any) -> None:
    m = fake(config(read_interval_s=0))
    m.client.fire_connect()
    m.client.make_readable()
    for _ in range(3):
        m.source.step()
    assert m.client.reads == 3


def test_acks_and_pings_still_go_out_while_paused(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    m.client.fire_message(b"t", b"x", mid=9)
    m.pipeline.full = True
    m.pipeline.acks.settle(m.pipeline.tickets)
    m.source.step()
    assert ("ack", 9, 1) in m.client.wire


def test_a_socket_with_a_file_descriptor_above_1023_is_served(fake: Any) -> None:
    high_fd = 1500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= high_fd:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} leaves no fd {high_fd}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, high_fd + 1), hard))
    try:
        m = fake()
        m.client.high_fd = high_fd
        m.client.fire_connect()
        assert m.client.sock is not None and m.client.sock.fileno() == high_fd
        m.client.make_readable()
        m.client.inbox = [(b"t", b"x", 1)]
        m.source.step()                 # select() would refuse this fd; the loop would retry forever
        assert m.client.reads == 2 and len(m.pipeline.messages) == 1
        assert m.source.stats()["loop_errors"] == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- failures and shutdown ------------------------------------------------------------------


def test_rounds_that_keep_failing_end_the_loop_instead_of_spinning(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    m.client.make_readable()
    m.client.read_error = OSError("fd out of range")
    with pytest.raises(NetworkLoopError, match="5 rounds in a row failed, the last with OSError: fd out of range"):
        for _ in range(10):
            m.source.step()
            m.clock.advance(60)                              # past the backoff between rounds
    assert m.source.stats()["loop_errors"] == 5


def test_loop_thread_death_turns_alive_false(fake: Any, caplog: Any) -> None:
    m = fake()
    m.client.socket_error = Boom("paho bug")
    with caplog.at_level(logging.CRITICAL, logger="gateway.source.mqtt"):
        m.source.start()
        assert m.client.socket_touched.wait(5)
        assert m.source.stop(5)
    assert not m.source.alive
    assert [r.getMessage() for r in caplog.records] == ["MQTT network loop died: Boom: paho bug"]


def test_stop_flushes_released_acks_then_disconnects(fake: Any) -> None:
    m = fake()
    m.client.fire_connect()
    m.client.fire_message(b"t", b"x", mid=3)
    m.pipeline.acks.settle(m.pipeline.tickets)
    m.source.start()
    assert m.source.stop(5)
    kinds = [p[0] for p in m.client.wire + m.client.out]
    assert kinds[-2:] == ["ack", "disconnect"]


def test_stop_returns_only_once_the_broker_has_closed_after_disconnect(fake: Any) -> None:
    """Until the broker closes, it may not have read the acks before DISCONNECT: a reset or a
    takeover by the next process would make it redeliver what was acked."""
    m = fake()
    m.client.broker_closes = False
    m.client.fire_connect()
    broker = m.client.peer
    assert broker is not None
    m.source.start()
    stopped: list[bool] = []
    stopping = threading.Thread(target=lambda: stopped.append(m.source.stop(5)))
    stopping.start()
    broker.settimeout(5)
    while broker.recv(4096):                 # until our half-close...
        pass
    broker.sendall(b"late bytes")            # ...after which the gateway still reads (a closed socket: EPIPE)
    assert not stopped
    broker.close()                           # the broker has read everything and closes
    stopping.join(5)
    assert stopped == [True]


class Metrics:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))


def test_metrics_follow_connection_grants_and_lost_sessions(fake: Any) -> None:
    metrics = Metrics()
    client = fake(metrics=metrics, subscriptions=[("a", 1)]).client
    client.fire_connect(session_present=True)
    client.fire_suback(1, [1])
    client.fire_disconnect()
    client.fire_connect(session_present=False)
    assert metrics.calls[:3] == [("set_connected", True), ("set_subscriptions_granted", False),
                                 ("set_subscriptions_granted", True)]
    assert ("set_connected", False) in metrics.calls and ("session_lost",) in metrics.calls


def readable(outbound: Outbound) -> bool:
    return bool(select.select([outbound.fileno()], [], [], 0)[0])


def test_an_ack_wakes_the_loop_only_when_its_next_round_is_far_off(fake: Any) -> None:
    m = fake(config(read_interval_s=0.1))
    m.client.fire_connect()
    outbound = m.outbound
    outbound.take()
    assert not outbound.sleeping(0.05, patience=0.1)        # a paced wait ends soon: no wake-up
    outbound.ack(1, 1)
    assert not readable(outbound)
    m.source.step()
    assert ("ack", 1, 1) in m.client.wire                   # it rode the next round
    assert not outbound.sleeping(15, patience=0.1)          # a long keepalive wait: wake it
    outbound.ack(2, 1)
    assert readable(outbound)
    m.source.step()
    assert ("ack", 2, 1) in m.client.wire


def test_a_topic_that_is_not_utf8_is_counted_in_the_metrics(fake: Any) -> None:
    metrics = Metrics()
    m = fake(metrics=metrics)
    m.client.fire_connect()
    m.client.fire_message(b"bad/\xff", b"x", mid=6)
    m.source.step()
    assert ("invalid_topic",) in metrics.calls
