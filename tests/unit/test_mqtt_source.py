"""MqttSource against a scripted fake paho client: no broker, no network, no sleeps.

The fake records what the source asked paho to do and lets the test fire paho's callbacks
(CONNACK, PUBLISH, SUBACK, disconnect) the way paho's loop thread would. Loop-level tests drive one
`_iterate()` round directly instead of running the thread.
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
import ssl
from typing import Any

import pytest
from paho.mqtt.client import ConnectFlags, DisconnectFlags, MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway.model import Message
from gateway.source.acks import AckTracker
from gateway.source.mqtt import MqttConfig, MqttSource, MqttSourceError
from gateway.source.subscriptions import SubscriptionBook


class Boom(BaseException):
    """Something a callback guard must not swallow (stands in for a paho bug killing the loop)."""


class FakeClient:
    """Just enough of paho.mqtt.client.Client for MqttSource; `out` is what would hit the wire."""

    def __init__(self, api: Any, **kwargs: Any) -> None:
        self.api, self.kwargs = api, kwargs
        self.calls: dict[str, Any] = {}
        self.out: list[tuple[Any, ...]] = []
        self.wire: list[tuple[Any, ...]] = []
        self.sock: socket.socket | None = None
        self._peer: socket.socket | None = None
        self._mids = itertools.count(1)
        self.reads = 0
        self.reconnect_error: BaseException | None = None
        self.socket_error: BaseException | None = None
        self.on_publish: Any = None

    # configuration ---------------------------------------------------------------------------
    def enable_logger(self, logger: Any) -> None:
        self.calls["enable_logger"] = logger

    def ws_set_options(self, path: str) -> None:
        self.calls["ws_set_options"] = path

    def tls_set(self, **kwargs: Any) -> None:
        if kwargs.get("ca_certs") == "missing.pem":
            raise FileNotFoundError(2, "No such file or directory")
        self.calls["tls_set"] = kwargs

    def tls_insecure_set(self, value: bool) -> None:
        self.calls["tls_insecure_set"] = value

    def username_pw_set(self, username: str, password: str | None) -> None:
        self.calls["username_pw_set"] = (username, password)

    def connect_async(self, host: str, port: int, keepalive: int, **kwargs: Any) -> None:
        self.calls["connect_async"] = (host, port, keepalive, kwargs)

    # network ---------------------------------------------------------------------------------
    def reconnect(self) -> int:
        if self.reconnect_error is not None:
            raise self.reconnect_error
        self.sock, self._peer = socket.socketpair()
        return 0

    def socket(self) -> socket.socket | None:
        if self.socket_error is not None:
            raise self.socket_error
        return self.sock

    def want_write(self) -> bool:
        return bool(self.out)

    def loop_read(self) -> int:
        self.reads += 1
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

    def subscribe(self, request: list[tuple[str, Any]]) -> tuple[int, int]:
        mid = next(self._mids)
        qos = [opt if isinstance(opt, int) else opt.QoS for _, opt in request]
        self.out.append(("subscribe", mid, [(f, q) for (f, _), q in zip(request, qos, strict=True)]))
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
        return 0

    # paho's loop thread, scripted --------------------------------------------------------------
    def fire_connect(self, session_present: bool = False, rc: int = 0) -> None:
        if self.sock is None:
            self.reconnect()
        self.on_connect(self, None, ConnectFlags(session_present),
                        ReasonCode(PacketTypes.CONNACK, identifier=rc), None)

    def fire_disconnect(self) -> None:
        self.sock = None
        self.on_disconnect(self, None, DisconnectFlags(False),
                           ReasonCode(PacketTypes.DISCONNECT, identifier=0x80), None)

    def fire_message(self, topic: bytes, payload: bytes, mid: int, qos: int = 1) -> None:
        msg = MQTTMessage(mid, topic)
        msg.payload, msg.qos = payload, qos
        self.on_message(self, None, msg)

    def fire_suback(self, mid: int, codes: list[int]) -> None:
        self.on_subscribe(self, None, mid, [ReasonCode(PacketTypes.SUBACK, identifier=c) for c in codes], None)

    def sent(self, kind: str) -> list[tuple[Any, ...]]:
        return [p for p in self.out + self.wire if p[0] == kind]

    def close(self) -> None:
        for s in (self.sock, self._peer):
            if s is not None:
                s.close()


class Pipeline:
    """Intake that makes one part per message, keeping tickets for the test to settle."""

    def __init__(self, parts: int = 1, fail: bool = False) -> None:
        self.parts, self.fail = parts, fail
        self.messages: list[Message] = []
        self.tickets: list[Any] = []
        self.source: MqttSource | None = None

    def __call__(self, message: Message, mid: int, qos: int) -> None:
        if self.fail:
            raise RuntimeError("router bug")
        self.messages.append(message)
        assert self.source is not None
        self.tickets.append(self.source.acks.arrived(mid, qos, self.parts))


def make(config: MqttConfig | None = None, **kwargs: Any) -> tuple[MqttSource, FakeClient, Pipeline]:
    pipeline = Pipeline(fail=kwargs.pop("fail", False))
    source = MqttSource(config or MqttConfig(client_id="gw-1"), pipeline,
                        client_factory=FakeClient, **kwargs)
    pipeline.source = source
    return source, source._client, pipeline


@pytest.fixture
def fake() -> Any:
    made: list[FakeClient] = []

    def _make(config: MqttConfig | None = None, **kwargs: Any) -> tuple[MqttSource, FakeClient, Pipeline]:
        source, client, pipeline = make(config, **kwargs)
        made.append(client)
        return source, client, pipeline

    yield _make
    for client in made:
        client.close()


def test_v5_persistent_session_connects_without_clean_start(fake: Any) -> None:
    _, client, _ = fake(MqttConfig(client_id="gw", session_expiry_s=600, receive_maximum=50))
    assert client.kwargs["protocol"] == MQTTProtocolVersion.MQTTv5
    assert client.kwargs["manual_ack"] is True and "clean_session" not in client.kwargs
    _, _, _, kwargs = client.calls["connect_async"]
    assert kwargs["clean_start"] is False
    assert kwargs["properties"].SessionExpiryInterval == 600
    assert kwargs["properties"].ReceiveMaximum == 50


def test_v311_persistent_session_uses_clean_session_false(fake: Any) -> None:
    _, client, _ = fake(MqttConfig(client_id="gw", protocol="3.1.1", keepalive_s=7))
    assert client.kwargs["protocol"] == MQTTProtocolVersion.MQTTv311
    assert client.kwargs["clean_session"] is False
    assert client.calls["connect_async"][2] == 7


def test_tls_verifies_certificates_unless_explicitly_insecure(fake: Any) -> None:
    _, client, _ = fake(MqttConfig(tls=True, ca_file="ca.pem", cert_file="c.pem", key_file="k.pem"))
    assert client.calls["tls_set"]["cert_reqs"] == ssl.CERT_REQUIRED
    assert "tls_insecure_set" not in client.calls
    _, insecure, _ = fake(MqttConfig(tls=True, tls_insecure=True))
    assert insecure.calls["tls_insecure_set"] is True


def test_unreadable_tls_file_is_a_single_line_error(fake: Any) -> None:
    with pytest.raises(MqttSourceError, match="TLS setup failed") as info:
        fake(MqttConfig(tls=True, ca_file="missing.pem"))
    assert "\n" not in str(info.value)


def test_websockets_transport_and_credentials_are_configured(fake: Any) -> None:
    _, client, _ = fake(MqttConfig(transport="websockets", ws_path="/ws", username="u", password="p"))
    assert client.kwargs["transport"] == "websockets"
    assert client.calls["ws_set_options"] == "/ws"
    assert client.calls["username_pw_set"] == ("u", "p")


def test_invalid_config_is_refused_in_one_line() -> None:
    with pytest.raises(MqttSourceError, match="protocol must be 5 or 3.1.1"):
        MqttConfig(protocol="4")


def test_every_connack_resubscribes_the_whole_set(fake: Any) -> None:
    source, client, _ = fake()
    source.set_subscriptions([("a/#", 1), ("b/+", 1)])
    client.fire_connect()
    client.fire_disconnect()
    client.out.clear()
    client.fire_connect(session_present=True)
    [(_, _, asked)] = client.sent("subscribe")
    assert asked == [("a/#", 1), ("b/+", 1)]


def test_subscription_changes_are_applied_as_a_diff_on_the_live_connection(fake: Any) -> None:
    source, client, _ = fake()
    source.set_subscriptions([("a/#", 1), ("b/+", 1), ("c", 1)])
    client.fire_connect()
    client.fire_suback(1, [1, 1, 1])
    client.out.clear()
    source.set_subscriptions([("b/+", 0), ("c", 1), ("d", 1)])
    source._service()
    # new filters first, then the removed ones: no moment with neither at the broker
    assert client.sent("subscribe") == [("subscribe", 2, [("b/+", 0), ("d", 1)])]
    assert client.sent("unsubscribe") == [("unsubscribe", 3, ["a/#"])]
    assert not source.subscriptions_granted
    client.fire_suback(2, [0, 1])
    assert source.subscriptions_granted
    assert source.subscriptions.status() == {"b/+": "granted qos 0", "c": "granted qos 1",
                                             "d": "granted qos 1"}


def test_share_group_prefixes_every_filter(fake: Any) -> None:
    source, client, _ = fake(MqttConfig(share_group="gw"))
    source.set_subscriptions([("welder/#", 1)])
    client.fire_connect()
    assert client.sent("subscribe")[0][2] == [("$share/gw/welder/#", 1)]


def test_refused_subscription_is_reported_not_ignored(fake: Any, caplog: Any) -> None:
    source, client, _ = fake()
    source.set_subscriptions([("ok/#", 1), ("secret/#", 1)])
    client.fire_connect()
    with caplog.at_level(logging.ERROR, logger="gateway.source.mqtt"):
        client.fire_suback(1, [1, 0x87])
    assert not source.subscriptions_granted
    assert source.subscriptions.status()["secret/#"] == "refused: Not authorized"
    assert source.stats()["subscriptions_refused"] == 1
    [line] = [r.getMessage() for r in caplog.records]
    assert "secret/#" in line and "Not authorized" in line


def test_lower_granted_qos_counts_as_refused(fake: Any) -> None:
    source, client, _ = fake()
    source.set_subscriptions([("a/#", 1)])
    client.fire_connect()
    client.fire_suback(1, [0])
    assert not source.subscriptions_granted
    assert "lower than requested" in source.subscriptions.refused["a/#"]


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


def test_message_becomes_a_gateway_message_and_is_acked_in_order(fake: Any) -> None:
    source, client, pipeline = fake()
    client.fire_connect()
    client.fire_message(b"t/1", b"one", mid=1)
    client.fire_message(b"t/2", b"two", mid=2)
    first, second = pipeline.messages
    assert isinstance(first, Message) and first.topic == "t/1" and first.payload == b"one"
    assert first.qos == 1 and first.received_ms > 0
    source.acks.settle([pipeline.tickets[1]])
    source._service()
    assert client.sent("ack") == []
    source.acks.settle([pipeline.tickets[0]])
    source._service()
    assert client.sent("ack") == [("ack", 1, 1), ("ack", 2, 1)]


def test_retain_flag_and_mqtt5_properties_travel_in_the_message(fake: Any) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    _, client, pipeline = fake()
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
    source, client, pipeline = fake()
    client.fire_connect()
    client.fire_message(b"bad/\xff", b"x", mid=5)
    source._service()
    assert pipeline.messages == []
    assert client.sent("ack") == [("ack", 5, 1)]
    assert source.stats()["invalid_topic"] == 1


def test_exception_in_intake_is_logged_and_never_reaches_paho(fake: Any, caplog: Any) -> None:
    source, client, _ = fake(fail=True)
    client.fire_connect()
    with caplog.at_level(logging.ERROR, logger="gateway.source.mqtt"):
        client.fire_message(b"t", b"x", mid=1)
    assert source.stats()["callback_errors"] == 1
    [record] = caplog.records
    assert "router bug" in record.getMessage() and record.exc_info is None


def test_ack_owed_to_an_earlier_connection_is_never_sent(fake: Any) -> None:
    source, client, pipeline = fake()
    client.fire_connect()
    client.fire_message(b"t", b"x", mid=1)
    client.fire_disconnect()
    source.acks.settle(pipeline.tickets)        # Kinesis answered while we were disconnected
    client.fire_connect(session_present=True)
    source._service()
    assert client.sent("ack") == []


def test_ack_released_just_before_a_reconnect_is_dropped(fake: Any) -> None:
    source, client, pipeline = fake()
    client.fire_connect()
    client.fire_message(b"t", b"x", mid=1)
    source.acks.settle(pipeline.tickets)        # queued for the loop, not yet flushed
    client.fire_disconnect()
    client.fire_connect(session_present=True)
    source._service()
    assert client.sent("ack") == []


def test_lost_session_on_reconnect_is_warned_and_counted(fake: Any, caplog: Any) -> None:
    source, client, _ = fake()
    with caplog.at_level(logging.WARNING, logger="gateway.source.mqtt"):
        client.fire_connect(session_present=False)          # first start: nothing to lose
        client.fire_disconnect()
        client.fire_connect(session_present=False)
    warnings = [r.getMessage() for r in caplog.records if "session lost" in r.getMessage()]
    assert warnings == ["broker session lost; messages queued while disconnected may be gone"]
    assert source.stats()["session_lost"] == 1 and source.session_present is False


def test_refused_connection_is_logged_once_per_reason(fake: Any, caplog: Any) -> None:
    source, client, _ = fake()
    client.reconnect_error = ConnectionRefusedError(111, "Connection refused")
    with caplog.at_level(logging.ERROR, logger="gateway.source.mqtt"):
        assert not source._connect_once()
        assert not source._connect_once()
        client.reconnect_error = None
        client.fire_connect(rc=0x86)                         # bad user name or password
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "connection refused" in lines[0]
    assert "Bad user name or password" in lines[1]
    assert source.stats()["connect_failures"] == 3 and not source.connected


def test_reconnect_delay_grows_with_jitter_up_to_the_cap(fake: Any) -> None:
    source, _, _ = fake(MqttConfig(reconnect_min_s=1, reconnect_max_s=8))
    delays = [source._next_delay() for _ in range(10)]
    caps = [1, 2, 4, 8, 8, 8, 8, 8, 8, 8]
    assert all(1 <= d <= cap for d, cap in zip(delays, caps, strict=True))


def test_publish_reports_delivery_even_when_puback_beats_the_return(fake: Any) -> None:
    source, client, _ = fake()
    client.fire_connect()
    results: list[tuple[bool, str]] = []
    early = source.publish("puback/before/return", b"x", on_delivered=lambda ok, r: results.append((ok, r)))
    later = source.publish("dead/letter", b"y", on_delivered=lambda ok, r: results.append((ok, r)))
    client.on_publish(client, None, later.mid, ReasonCode(PacketTypes.PUBACK, identifier=0x87), None)
    assert results == [(True, "Success"), (False, "Not authorized")]
    assert early.mid != later.mid and source._pub_early == {} and source._pub_callbacks == {}


def test_paused_source_reads_one_packet_per_quarter_keepalive(fake: Any) -> None:
    source, client, _ = fake(MqttConfig(keepalive_s=60))
    client.fire_connect()
    client._peer.sendall(b"pending publishes")            # the socket is readable
    source.pause()
    source._iterate(max_wait=0)
    assert client.reads == 1                              # the first paused round reads one
    source._iterate(max_wait=0)
    assert client.reads == 1                              # next read only after keepalive/4
    source._next_paused_read = 0
    source._iterate(max_wait=0)
    assert client.reads == 2
    source.resume()
    source._iterate(max_wait=0)
    assert client.reads == 3                              # a burst stops when no PUBLISH came in


def test_drained_socket_is_read_again_only_after_the_read_interval(fake: Any) -> None:
    source, client, pipeline = fake(MqttConfig(read_interval_s=60))
    client.fire_connect()
    client.fire_message(b"t", b"x", mid=4)
    client._peer.sendall(b"more publishes")               # the socket stays readable
    source._iterate(max_wait=0)
    assert client.reads == 1                              # read until drained...
    source._iterate(max_wait=0)
    assert client.reads == 1                              # ...then not again within the interval
    source.acks.settle(pipeline.tickets)
    source._iterate(max_wait=0)
    assert ("ack", 4, 1) in client.wire                   # acks do not wait for it
    source._next_read = 0
    source._iterate(max_wait=0)
    assert client.reads == 2


def test_every_read_round_ends_with_after_read_even_when_intake_fails(fake: Any) -> None:
    source, client, _ = fake()
    rounds: list[int] = []
    source.set_after_read(lambda: rounds.append(client.reads))
    client.fire_connect()
    client._peer.sendall(b"pending publishes")
    source._iterate(max_wait=0)
    client.loop_read = lambda: (_ for _ in ()).throw(RuntimeError("paho bug"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        source._read(paused=False)
    assert rounds == [1, 1]


def test_an_ack_wakes_the_loop_only_when_its_next_round_is_far_off(fake: Any) -> None:
    source, client, _ = fake(MqttConfig(read_interval_s=0.1))
    client.fire_connect()

    def woken() -> bool:
        source._wake_r.setblocking(False)
        try:
            return bool(source._wake_r.recv(64))
        except BlockingIOError:
            return False
        finally:
            source._ack_wake_sent = False

    woken()
    source._round_due = time.monotonic() + 0.05          # a paced select ends soon: no wake-up
    source.ack(1, 1)
    assert not woken()
    source._round_due = time.monotonic() + 15            # a long keepalive select: wake it
    source.ack(2, 1)
    assert woken()
    source._iterate(max_wait=0)
    assert ("ack", 1, 1) in client.wire and ("ack", 2, 1) in client.wire


def test_reads_are_not_paced_while_messages_arrive_fast(fake: Any) -> None:
    source, client, _ = fake(MqttConfig(read_interval_s=0.5))
    client.fire_connect()
    client._peer.sendall(b"pending publishes")
    source._rate_since, source._received = time.monotonic() - 1.0, 5000   # 5,000 msg/s so far
    source._iterate(max_wait=0)
    source._iterate(max_wait=0)
    assert client.reads == 2


def test_read_interval_zero_reads_whenever_the_socket_is_readable(fake: Any) -> None:
    source, client, _ = fake(MqttConfig(read_interval_s=0))
    client.fire_connect()
    client._peer.sendall(b"pending publishes")
    for _ in range(3):
        source._iterate(max_wait=0)
    assert client.reads == 3


def test_acks_and_pings_still_go_out_while_paused(fake: Any) -> None:
    source, client, pipeline = fake()
    client.fire_connect()
    client.fire_message(b"t", b"x", mid=9)
    source.pause()
    source._next_paused_read = float("inf")
    source.acks.settle(pipeline.tickets)
    source._iterate(max_wait=0)
    assert ("ack", 9, 1) in client.wire


def test_loop_thread_death_turns_alive_false_and_tells_the_app(fake: Any) -> None:
    fatal: list[BaseException] = []
    source, client, _ = fake(on_fatal=fatal.append)
    client.socket_error = Boom("paho bug")
    source.start()
    source._thread.join(5)
    assert not source.alive
    assert isinstance(fatal[0], Boom)


def test_stop_flushes_released_acks_then_disconnects(fake: Any) -> None:
    source, client, pipeline = fake()
    client.fire_connect()
    client.fire_message(b"t", b"x", mid=3)
    source.acks.settle(pipeline.tickets)
    source._shutdown()
    kinds = [p[0] for p in client.wire + client.out]
    assert kinds[-2:] == ["ack", "disconnect"]


class Metrics:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, *args))


def test_metrics_follow_connection_grants_and_lost_sessions(fake: Any) -> None:
    metrics = Metrics()
    source, client, _ = fake(metrics=metrics)
    source.set_subscriptions([("a", 1)])
    client.fire_connect(session_present=True)
    client.fire_suback(1, [1])
    client.fire_disconnect()
    client.fire_connect(session_present=False)
    assert metrics.calls[:3] == [("set_connected", True), ("set_subscriptions_granted", False),
                                 ("set_subscriptions_granted", True)]
    assert ("set_connected", False) in metrics.calls and ("session_lost",) in metrics.calls


def test_dead_letter_publish_reports_broker_answer_or_refusal(fake: Any) -> None:
    source, client, _ = fake()
    client.fire_connect()
    outcomes: list[bool] = []
    source.publish_dead_letter("dlq/gateway", b"x", outcomes.append)
    [(_, mid, topic, _, qos)] = client.sent("publish")
    assert (topic, qos, outcomes) == ("dlq/gateway", 1, [])
    client.on_publish(client, None, mid, ReasonCode(PacketTypes.PUBACK, identifier=0), None)
    source.publish_dead_letter("dlq/+", b"x", outcomes.append)
    assert outcomes == [True, False]


def test_tracker_built_outside_is_used_for_messages_and_connections(fake: Any) -> None:
    source, client, _ = fake()
    tracker = AckTracker(source.ack)
    source.set_ack_tracker(tracker)
    client.fire_connect()
    assert tracker.generation == 1
