"""MqttSource against a real mosquitto on 127.0.0.1: sessions, redelivery, ack order, backpressure,
and a broker's in-flight window (the last also through a whole gateway process and moto).

Each test starts its own broker (tests.support.services.Mosquitto, stopped by pid) with
`max_queued_messages` raised so the broker's own queue limit never hides a gateway bug.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from gateway.model import Message
from gateway.settings.settings import load_settings
from gateway.source.acks import AckTracker
from gateway.source.fastpath import BufferedClient
from gateway.source.mqtt import MqttSource
from gateway.source.outbound import Outbound
from tests.support.certs import make_test_pki
from tests.support.gatewayproc import GatewayProcess, write_routes
from tests.support.oracle import emit, wait_delivered, wait_until
from tests.support.publisher import Publisher
from tests.support.services import Mosquitto, TlsFiles, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}


class Intake:
    """The pipeline's seat (the source's hooks): keeps every message and ticket; settles at once
    unless `hold`; `full` is the backlog."""

    def __init__(self, acks: AckTracker, outbound: Outbound, hold: bool = False) -> None:
        self.acks, self.outbound, self.hold = acks, outbound, hold
        self.full = threading.Event()
        self.cond = threading.Condition()
        self.seqs: list[int] = []
        self.mids: list[int] = []
        self.tickets: list[Any] = []

    def intake(self, message: Message, mid: int, qos: int) -> None:
        ticket = self.acks.arrived(mid, qos, 1)
        with self.cond:
            self.seqs.append(json.loads(message.payload).get("seq", -1))
            self.mids.append(mid)
            self.tickets.append(ticket)
            self.cond.notify_all()
        if not self.hold:
            self.acks.settle([ticket])

    def after_read(self) -> None:
        pass

    def send_now(self) -> None:
        pass

    def backlog_full(self) -> bool:
        return self.full.is_set()

    def wait_for(self, predicate: Callable[[list[int]], bool], timeout: float = 15.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.seqs), timeout)

    def count(self) -> int:
        with self.cond:
            return len(self.seqs)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path / "broker", max_queued_messages=100_000)
    m.start()
    try:
        yield m
    finally:
        m.stop()


class RecordingClient(BufferedClient):
    """The gateway's paho client, noting every ack it is asked to put on the wire."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acked: list[int] = []

    def ack(self, mid: int, qos: int) -> Any:
        self.acked.append(mid)
        return super().ack(mid, qos)


@pytest.fixture
def sources() -> Iterator[Callable[..., tuple[MqttSource, Intake]]]:
    started: list[tuple[MqttSource, Outbound]] = []
    documented = load_settings({"MQTT_HOST": "127.0.0.1", "GATEWAY_ROUTES": "routes.yaml"}).mqtt

    def start(port: int, *, client_id: str = "gw-test", protocol: str = "5", hold: bool = False,
              subscriptions: list[tuple[str, int]] | None = None, wait: bool = True,
              client_factory: Callable[..., Any] = BufferedClient,
              make_hooks: Callable[[AckTracker, Outbound, bool], Intake] = Intake,
              **kwargs: Any) -> tuple[MqttSource, Intake]:
        outbound = Outbound()
        acks = AckTracker(outbound)
        intake = make_hooks(acks, outbound, hold)
        config = replace(documented, **{"port": port, "client_id": client_id, "protocol": protocol,
                                        "persistent": True, "read_interval_s": 0.0, **kwargs})
        source = MqttSource(config, hooks=intake, acks=acks, outbound=outbound,
                            subscriptions=subscriptions or [("welder/#", 1)], client_factory=client_factory)
        source.start()
        started.append((source, outbound))
        if wait:
            assert source.wait_connected(10), "source did not connect"
            assert source.wait_subscribed(10), source.subscriptions.status()
        return source, intake

    yield start
    for source, outbound in started:
        source.stop(5)
        outbound.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_persistent_session_survives_a_source_restart(broker: Mosquitto, sources: Any,
                                                      protocol: str) -> None:
    first, _ = sources(broker.port, protocol=protocol, client_id=f"gw-persist-{protocol}")
    assert first.stop(5)
    with Publisher(port=broker.port, protocol=PROTOCOLS[protocol]) as pub:
        pub.publish_range(300)
        assert pub.wait_acked(15)
    second, intake = sources(broker.port, protocol=protocol, client_id=f"gw-persist-{protocol}")
    assert second.session_present is True
    assert intake.wait_for(lambda seqs: set(range(300)) <= set(seqs)), f"got {intake.count()}"
    assert second.stats()["session_lost"] == 0


def test_unacked_messages_are_redelivered_after_reconnect(broker: Mosquitto, sources: Any) -> None:
    first, held = sources(broker.port, client_id="gw-redeliver", hold=True)
    with Publisher(port=broker.port) as pub:
        pub.publish_range(15)
        assert pub.wait_acked(15)
        assert held.wait_for(lambda seqs: len(seqs) == 15)
        assert first.stop(5)                       # nothing was settled: nothing was acked
        again, intake = sources(broker.port, client_id="gw-redeliver")
        assert intake.wait_for(lambda seqs: set(range(15)) <= set(seqs))
        assert again.stop(5)                       # this time everything was acked
        _last, after = sources(broker.port, client_id="gw-redeliver")
        pub.publish(1000)
        assert after.wait_for(lambda seqs: 1000 in seqs)
    assert after.seqs == [1000]


def test_acks_go_out_in_arrival_order_whatever_order_kinesis_answers(
        broker: Mosquitto, sources: Any) -> None:
    clients: list[RecordingClient] = []

    def recording(*args: Any, **kwargs: Any) -> RecordingClient:
        clients.append(RecordingClient(*args, **kwargs))
        return clients[-1]

    source, intake = sources(broker.port, client_id="gw-order", hold=True, client_factory=recording)
    acked = clients[0].acked
    with Publisher(port=broker.port) as pub:
        pub.publish_range(20)        # mosquitto's default in-flight window is 20
        assert intake.wait_for(lambda seqs: len(seqs) == 20)
        tickets = list(intake.tickets)
        random.Random(7).shuffle(tickets)
        settlers = [threading.Thread(target=intake.acks.settle, args=(tickets[i::4],)) for i in range(4)]
        for t in settlers:
            t.start()
        for t in settlers:
            t.join()
        assert intake.wait_for(lambda seqs: len(seqs) >= 20)
        deadline = time.monotonic() + 10
        while len(acked) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert acked == intake.mids[:20]
        assert source.stop(5)
        _, after = sources(broker.port, client_id="gw-order")
        pub.publish(1000)
        assert after.wait_for(lambda seqs: 1000 in seqs)
    assert after.seqs == [1000]                    # every ack reached the broker


def test_paused_source_keeps_its_connection_across_keepalives(broker: Mosquitto, sources: Any) -> None:
    source, intake = sources(broker.port, client_id="gw-pause", keepalive_s=2)
    full = intake.full
    full.set()
    with Publisher(port=broker.port) as pub:
        pub.publish_range(200)
        assert pub.wait_acked(15)
        time.sleep(6.5)                            # > 3 keepalives with the backlog full
        assert source.connected and source.stats()["disconnects"] == 0
        assert intake.count() <= 6.5 * 4 / 2 + 2   # one packet per keepalive/4 slips through
        assert "exceeded timeout" not in broker.log_text()
        full.clear()
        intake.outbound.wake()                     # what the pipeline does when its backlog has room
        assert intake.wait_for(lambda seqs: set(range(200)) <= set(seqs))
    assert source.stats()["connects"] == 1


def test_subscription_changes_apply_on_the_same_connection(broker: Mosquitto, sources: Any) -> None:
    source, intake = sources(broker.port, client_id="gw-diff", subscriptions=[("a/#", 1)])
    source.update_subscriptions([("b/#", 1)])
    assert source.wait_subscribed(10) and set(source.subscriptions.status()) == {"b/#"}
    with Publisher(port=broker.port, topic_for=lambda seq: "a/x" if seq == 0 else "b/x") as pub:
        pub.publish_range(2)
        assert intake.wait_for(lambda seqs: 1 in seqs)
    assert intake.seqs == [1]
    assert source.stats()["connects"] == 1


def test_qos_downgraded_by_the_broker_is_reported_as_refused(tmp_path: Path, sources: Any) -> None:
    with Mosquitto(tmp_path / "maxqos0", extra_conf=["max_qos 0"]) as m:
        source, _ = sources(m.port, client_id="gw-refused", wait=False)
        assert source.wait_connected(10)
        assert not source.wait_subscribed(10)
        assert "lower than requested" in source.subscriptions.refused["welder/#"]
        assert source.stats()["subscriptions_refused"] == 1


def test_source_retries_a_refused_connection_and_recovers(tmp_path: Path, sources: Any) -> None:
    port = free_port()
    source, intake = sources(port, client_id="gw-retry", wait=False,
                             reconnect_min_s=0.05, reconnect_max_s=0.2)
    deadline = time.monotonic() + 10
    while source.stats()["connect_failures"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert source.stats()["connect_failures"] >= 3 and source.alive
    with Mosquitto(tmp_path / "late", port=port) as m:
        assert source.wait_connected(10) and source.wait_subscribed(10)
        with Publisher(port=m.port) as pub:
            pub.publish(5)
            assert intake.wait_for(lambda seqs: 5 in seqs)


def test_mutual_tls_connects_with_verification_on(tmp_path: Path, sources: Any) -> None:
    pki = make_test_pki(tmp_path / "pki")
    tls = TlsFiles(pki.ca, pki.server.cert, pki.server.key)
    with Mosquitto(tmp_path / "tls", tls=tls, require_certificate=True) as m:
        _source, intake = sources(m.tls_port, client_id="gw-tls", tls=True, ca_file=str(pki.ca),
                                  cert_file=str(pki.client.cert), key_file=str(pki.client.key))
        with Publisher(port=m.port) as pub:
            pub.publish(1)
            assert intake.wait_for(lambda seqs: 1 in seqs)


def test_wrong_ca_is_one_log_line_and_bounded_retries(tmp_path: Path, sources: Any,
                                                      caplog: Any) -> None:
    pki = make_test_pki(tmp_path / "pki")
    tls = TlsFiles(pki.ca, pki.server.cert, pki.server.key)
    with Mosquitto(tmp_path / "tls", tls=tls) as m, caplog.at_level(logging.ERROR):
        source, _ = sources(m.tls_port, client_id="gw-badca", wait=False, tls=True,
                            ca_file=str(pki.other_ca), reconnect_min_s=0.05, reconnect_max_s=0.1)
        deadline = time.monotonic() + 10
        while source.stats()["connect_failures"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert source.stats()["connect_failures"] >= 3 and not source.connected and source.alive
        assert source.stop(5)
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.source.mqtt"]
    assert len(lines) == 1 and "TLS certificate verification failed" in lines[0]
    assert all(r.exc_info is None for r in caplog.records)


# --- a broker whose in-flight window is one message (ejabberd's) --------------------------------

WINDOW_MESSAGES = 200


class Lingering(Intake):
    """Settles what it holds once a linger has passed, as the pipeline's sink does, or at once
    when the source calls `send_now()`."""

    def __init__(self, acks: AckTracker, outbound: Outbound, linger_s: float = 0.2) -> None:
        super().__init__(acks, outbound, hold=True)
        self.sent_now = 0
        self._urgent = threading.Event()
        self._done = threading.Event()
        self._settled = 0
        self._sender = threading.Thread(target=self._send, args=(linger_s,), daemon=True)
        self._sender.start()

    def send_now(self) -> None:
        self.sent_now += 1
        self._urgent.set()

    def close(self) -> None:
        self._done.set()
        self._urgent.set()
        self._sender.join(5)

    def _send(self, linger_s: float) -> None:
        while not self._done.is_set():
            self._urgent.wait(linger_s)
            self._urgent.clear()
            with self.cond:
                due, self._settled = self.tickets[self._settled:], len(self.tickets)
            self.acks.settle(due)


def test_the_source_asks_for_held_messages_at_once_when_the_window_is_full(
        mosquitto_factory: Callable[..., Mosquitto], sources: Any) -> None:
    broker = mosquitto_factory(max_inflight_messages=1)
    lingering: list[Lingering] = []

    def hooks(acks: AckTracker, outbound: Outbound, hold: bool) -> Lingering:
        lingering.append(Lingering(acks, outbound))
        return lingering[-1]

    _source, intake = sources(broker.port, client_id="gw-window", protocol="3.1.1", read_interval_s=0.1,
                             make_hooks=hooks)
    try:
        with Publisher(port=broker.port, protocol=PROTOCOLS["3.1.1"]) as pub:
            started = time.monotonic()
            pub.publish_range(WINDOW_MESSAGES)
            assert intake.wait_for(lambda seqs: len(seqs) >= WINDOW_MESSAGES, timeout=60), f"got {intake.count()}"
            elapsed = time.monotonic() - started
    finally:
        lingering[0].close()
    assert elapsed < 10, f"{WINDOW_MESSAGES} messages through a window of one took {elapsed:.1f}s"
    assert lingering[0].sent_now >= WINDOW_MESSAGES - 2      # every message but the first ones


@pytest.mark.timeout(120)
def test_a_window_of_one_message_does_not_make_the_linger_the_throughput_limit(
        tmp_path: Path, kinesis_stream: str, kinesis: Any, mosquitto_factory: Callable[..., Mosquitto],
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    """Mosquitto's max_inflight_messages 1 on MQTT 3.1.1 sends the next QoS 1 message only after
    the previous PUBACK, as ejabberd does. Held for the read interval and the linger (100 + 200 ms
    by default), 200 messages would take a minute; the gateway must see the window and not wait."""
    broker = mosquitto_factory(max_inflight_messages=1)
    routes = write_routes(tmp_path / "routes.yaml", f"""\
version: 1
routes:
  - name: welders
    topic: "welder/#"
    stream: {kinesis_stream}
    partition_key: name
    qos: 1
""")
    gw = gateway_process(routes, mqtt_port=broker.port, extra_env={"MQTT_PROTOCOL": "3.1.1"})
    pub = publisher(port=broker.port)
    started = time.monotonic()
    pub.publish_range(WINDOW_MESSAGES)
    assert pub.wait_acked(30)
    assert wait_until(lambda: gw.metric("records_put_total") >= WINDOW_MESSAGES, 80, poll_s=0.05), (
        f"put {gw.metric('records_put_total'):.0f} of {WINDOW_MESSAGES}\n{gw.output_tail()}")
    elapsed = time.monotonic() - started
    report, _ = wait_delivered(kinesis, kinesis_stream, pub.acked, WINDOW_MESSAGES, timeout=30)
    emit("window-of-one", f"{report} | duration={elapsed:.1f}s")
    report.assert_no_loss()
    assert elapsed < 10, f"{WINDOW_MESSAGES} messages through a window of one took {elapsed:.1f}s"
