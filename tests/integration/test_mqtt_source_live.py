"""MqttSource against a real mosquitto on 127.0.0.1: sessions, redelivery, ack order, backpressure.

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
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from gateway.model import Message
from gateway.source.mqtt import MqttConfig, MqttSource
from tests.support.publisher import Publisher
from tests.support.certs import make_test_pki
from tests.support.services import Mosquitto, TlsFiles, free_port

pytestmark = pytest.mark.timeout(90)

PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}


class Intake:
    """The pipeline's seat: keeps every message and ticket; settles at once unless `hold`."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.source: MqttSource | None = None
        self.cond = threading.Condition()
        self.seqs: list[int] = []
        self.mids: list[int] = []
        self.tickets: list[Any] = []

    def __call__(self, message: Message, mid: int, qos: int) -> None:
        assert self.source is not None
        ticket = self.source.acks.arrived(mid, qos, 1)
        with self.cond:
            self.seqs.append(json.loads(message.payload).get("seq", -1))
            self.mids.append(mid)
            self.tickets.append(ticket)
            self.cond.notify_all()
        if not self.hold:
            self.source.acks.settle([ticket])

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


@pytest.fixture
def sources() -> Iterator[Callable[..., tuple[MqttSource, Intake]]]:
    started: list[MqttSource] = []

    def start(port: int, *, client_id: str = "gw-test", protocol: str = "5", hold: bool = False,
              subscriptions: list[tuple[str, int]] | None = None, wait: bool = True,
              **kwargs: Any) -> tuple[MqttSource, Intake]:
        intake = Intake(hold)
        backlog_full = kwargs.pop("backlog_full", None)
        config = MqttConfig(host="127.0.0.1", port=port, client_id=client_id, protocol=protocol,
                            **kwargs)
        source = MqttSource(config, intake, backlog_full=backlog_full)
        intake.source = source
        source.set_subscriptions(subscriptions or [("welder/#", 1)])
        source.start()
        started.append(source)
        if wait:
            assert source.wait_connected(10), "source did not connect"
            assert source.wait_subscribed(10), source.subscriptions.status()
        return source, intake

    yield start
    for source in started:
        source.stop(5)


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
        last, after = sources(broker.port, client_id="gw-redeliver")
        pub.publish(1000)
        assert after.wait_for(lambda seqs: 1000 in seqs)
    assert after.seqs == [1000]


def test_acks_go_out_in_arrival_order_whatever_order_kinesis_answers(
        broker: Mosquitto, sources: Any) -> None:
    source, intake = sources(broker.port, client_id="gw-order", hold=True)
    acked: list[int] = []
    client_ack = source._client.ack

    def recording_ack(mid: int, qos: int) -> Any:
        acked.append(mid)
        return client_ack(mid, qos)

    source._client.ack = recording_ack
    with Publisher(port=broker.port) as pub:
        pub.publish_range(20)        # mosquitto's default in-flight window is 20
        assert intake.wait_for(lambda seqs: len(seqs) == 20)
        tickets = list(intake.tickets)
        random.Random(7).shuffle(tickets)
        settlers = [threading.Thread(target=source.acks.settle, args=(tickets[i::4],)) for i in range(4)]
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
    full = threading.Event()
    source, intake = sources(broker.port, client_id="gw-pause", keepalive_s=2,
                             backlog_full=full.is_set)
    full.set()
    with Publisher(port=broker.port) as pub:
        pub.publish_range(200)
        assert pub.wait_acked(15)
        time.sleep(6.5)                            # > 3 keepalives with the backlog full
        assert source.connected and source.stats()["disconnects"] == 0
        assert intake.count() <= 6.5 * 4 / 2 + 2   # one packet per keepalive/4 slips through
        assert "exceeded timeout" not in broker.log_text()
        full.clear()
        source.resume()
        assert intake.wait_for(lambda seqs: set(range(200)) <= set(seqs))
    assert source.stats()["connects"] == 1


def test_subscription_changes_apply_on_the_same_connection(broker: Mosquitto, sources: Any) -> None:
    source, intake = sources(broker.port, client_id="gw-diff", subscriptions=[("a/#", 1)])
    source.set_subscriptions([("b/#", 1)])
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
        source, intake = sources(m.tls_port, client_id="gw-tls", tls=True, ca_file=str(pki.ca),
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
