"""The broker side breaks: restarted, killed, partitioned, cut again and again (docs/delivery.md#how-the-guarantees-are-tested).

What must hold: the gateway reconnects by itself with capped backoff, resubscribes, never sends an
ack owed to an old connection on a new one, and its own process does not accumulate threads over
reconnect storms. Broker-side loss is only allowed where the broker itself loses (kill -9 of
mosquitto loses its unsaved queue, docs/delivery.md#the-brokers-limits-are-the-loss-points) and then it must be reported.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from tests.fault.helpers import Rig, log_messages, scale, threads_of
from tests.support.oracle import wait_until
from tests.support.tcpproxy import TcpProxy

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def test_broker_sigterm_restart_with_persistence_loses_nothing(rig: Rig, report,
                                                               mosquitto_factory: Any) -> None:
    """#5a: mosquitto (persistence on) SIGTERMed and restarted twice while messages flow."""
    broker = mosquitto_factory(persistence=True)
    gw = rig.gateway(mqtt_port=broker.port)
    rig.proxy.delay(0.2)                     # keep some messages unacked at each restart
    acked: set[int] = set()
    sent = 0
    for round_ in range(3):
        pub = rig.publisher(port=broker.port)
        pub.publish_range(range(round_ * 2000, round_ * 2000 + 2000), rate=2000)
        assert pub.wait_acked(30)
        acked |= pub.acked
        sent += len(pub.sent)
        pub.close()
        if round_ < 2:
            broker.restart()
    records = rig.wait_delivered(acked, timeout=90)
    rep = report(acked, records, sent=sent, reconnects=gw.metric("mqtt_sessions_lost_total"))
    rep.assert_no_loss()
    assert gw.alive
    assert gw.metric("mqtt_sessions_lost_total") == 0, "SIGTERM with persistence keeps the session"


def test_broker_sigkill_reports_the_lost_session_and_keeps_running(rig: Rig, report,
                                                                  mosquitto_factory: Any) -> None:
    """#5b: mosquitto kill -9 (no save): the gateway reports "session lost" and keeps delivering."""
    broker = mosquitto_factory(persistence=True)
    gw = rig.gateway(mqtt_port=broker.port)
    pub = rig.publisher(port=broker.port)
    pub.publish_range(1000)
    assert pub.wait_acked(30)
    before = set(pub.acked)
    rig.wait_delivered(before, timeout=60)
    pub.close()
    broker.kill()
    time.sleep(1.0)
    broker.start()
    assert wait_until(lambda: gw.metric("mqtt_connected") == 1, 30), gw.output_tail()
    assert wait_until(lambda: gw.metric("subscriptions_granted") == 1, 10)
    pub2 = rig.publisher(port=broker.port)
    pub2.publish_range(range(1000, 2000))
    assert pub2.wait_acked(30)
    acked = before | pub2.acked
    records = rig.wait_delivered(acked, timeout=60)
    rep = report(acked, records, sent=len(pub.sent) + len(pub2.sent),
                 sessions_lost=gw.metric("mqtt_sessions_lost_total"))
    rep.assert_no_loss()
    assert gw.alive
    assert gw.metric("mqtt_sessions_lost_total") >= 1
    assert any("session lost" in m for m in log_messages(gw))


def test_partition_is_detected_within_keepalive_and_heals(rig: Rig, report, mosquitto: Any,
                                                          tcp_proxy: TcpProxy) -> None:
    """#6: blackhole the gateway↔broker link for 3× keepalive while publishing continues."""
    keepalive = scale(5, 10)
    gw = rig.gateway(mqtt_port=tcp_proxy.port, extra_env={"MQTT_KEEPALIVE_S": str(int(keepalive))})
    pub = rig.publisher()                           # straight to the broker: not partitioned
    pub.publish_range(500)
    assert pub.wait_acked(30)
    rig.wait_delivered(pub.acked, timeout=30)
    threads_before = threads_of(gw.pid)
    t0 = time.monotonic()
    tcp_proxy.blackhole()
    feeder = pub.publish_in_background(range(500, 1500), rate=1000 / (3 * keepalive))
    assert wait_until(lambda: gw.metric("mqtt_connected") == 0, 3 * keepalive, poll_s=0.2)
    detected = time.monotonic() - t0
    remaining = 3 * keepalive - (time.monotonic() - t0)
    if remaining > 0:
        time.sleep(remaining)
    readiness_during = gw.http_get("/readyz")[0]
    liveness_during = gw.http_get("/healthz")[0]
    tcp_proxy.heal()
    t1 = time.monotonic()
    assert wait_until(lambda: gw.metric("mqtt_connected") == 1, 30), gw.output_tail()
    reconnected = time.monotonic() - t1
    feeder.join(30)
    assert pub.wait_acked(30)
    records = rig.wait_delivered(pub.acked, timeout=60)
    threads_after = threads_of(gw.pid)
    rep = report(pub.acked, records, sent=len(pub.sent), keepalive_s=keepalive,
                 detected_s=round(detected, 1), reconnected_s=round(reconnected, 1),
                 threads=f"{threads_before}->{threads_after}")
    rep.assert_no_loss()
    assert detected <= 1.5 * keepalive + 0.5 * keepalive, f"disconnect seen after {detected:.1f}s"
    assert readiness_during == 503 and liveness_during == 200
    assert gw.alive and gw.http_get("/healthz")[0] == 200
    assert threads_after <= threads_before + 2


def test_reconnect_storm_leaks_no_threads(rig: Rig, report, mosquitto: Any, tcp_proxy: TcpProxy,
                                          rng: random.Random) -> None:
    """~10 connection cuts while messages flow: thread count of the gateway pid stays put."""
    cuts = int(scale(10, 30))
    gw = rig.gateway(mqtt_port=tcp_proxy.port)
    pub = rig.publisher()
    pub.publish_range(200)
    assert pub.wait_acked(30)
    rig.wait_delivered(pub.acked, timeout=30)
    threads_before = threads_of(gw.pid)
    feeder = pub.publish_in_background(range(200, 200 + cuts * 300), rate=300)
    connects = []
    for _ in range(cuts):
        time.sleep(rng.uniform(0.3, 1.2))
        tcp_proxy.cut()
        time.sleep(rng.uniform(0.0, 0.5))
        tcp_proxy.heal()
        assert wait_until(lambda: gw.metric("mqtt_connected") == 1, 15), gw.output_tail()
        connects.append(tcp_proxy.accepted)
    feeder.join(60)
    assert pub.wait_acked(30)
    records = rig.wait_delivered(pub.acked, timeout=60)
    time.sleep(1)
    threads_after = threads_of(gw.pid)
    rep = report(pub.acked, records, sent=len(pub.sent), cuts=cuts,
                 connections=tcp_proxy.accepted, threads=f"{threads_before}->{threads_after}")
    rep.assert_no_loss()
    assert gw.alive
    assert threads_after <= threads_before + 2, f"threads {threads_before} -> {threads_after}"


def test_reconnect_with_writes_in_flight_acks_nothing_unwritten(rig: Rig, report, mosquitto: Any,
                                                                tcp_proxy: TcpProxy) -> None:
    """#19: cut the broker link while ~100+ PutRecords entries are in flight (slow Kinesis)."""
    gw = rig.gateway(mqtt_port=tcp_proxy.port, extra_env={"KINESIS_BATCH_RECORDS": "50"})
    rig.proxy.delay(1.5)
    pub = rig.publisher()
    feeder = pub.publish_in_background(3000, rate=1000)
    for _ in range(3):
        time.sleep(0.8)
        tcp_proxy.cut()
        time.sleep(0.2)
        tcp_proxy.heal()
    feeder.join(30)
    assert pub.wait_acked(30)
    rig.proxy.pass_through()
    records = rig.wait_delivered(pub.acked, timeout=90)
    rep = report(pub.acked, records, sent=len(pub.sent), cuts=3)
    rep.assert_no_loss()
    assert gw.alive
