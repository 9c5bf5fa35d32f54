"""Issue 3's delivery promises, proven with real processes: mosquitto, moto over HTTP, the gateway.

Each test publishes seq-stamped QoS 1 messages, reads every stream back through boto3 and prints
one DeliveryReport line (also appended to $GATEWAY_TEST_REPORT when set) so the closing note can
quote the figures. Waits poll a condition with a generous timeout; the only fixed-length wait is
the 30 s Kinesis outage itself, which is the scenario under test, not a guess at timing.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.gatewayproc import GatewayProcess, write_routes
from tests.support.oracle import check_delivery, emit, seqs_in, wait_delivered, wait_until
from tests.support.publisher import Publisher
from tests.support.services import Mosquitto, read_all

pytestmark = pytest.mark.integration

def single_route(tmp_path: Path, stream: str) -> Path:
    return write_routes(tmp_path / "routes.yaml", f"""\
version: 1
routes:
  - name: welders
    topic: "welder/#"
    stream: {stream}
    partition_key: name
    qos: 1
""")


# --- 1. overlapping routes over two streams -----------------------------------------------------

MACHINES = ("welder", "press")


def factory_topic(seq: int) -> str:
    """Three lines, two machine kinds, seven devices: every route overlaps some of the others."""
    return f"factory/line{seq % 3 + 1}/{MACHINES[(seq // 3) % 2]}/d{seq % 7}"


@pytest.mark.timeout(180)
def test_overlapping_routes_put_every_message_on_the_right_streams_with_the_right_keys(
        tmp_path: Path, make_stream: Callable[..., str], kinesis: Any, mosquitto: Mosquitto,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    n = 10_000
    stream_a, stream_b = make_stream(suffix="-a"), make_stream(suffix="-b")
    routes = write_routes(tmp_path / "routes.yaml", f"""\
version: 1
defaults:
  qos: 1
routes:
  - name: everything
    topic: "factory/#"
    stream: {stream_a}
    partition_key: name
  - name: welders
    topic: "factory/+/welder/#"
    stream: {stream_b}
    partition_key: "topic(`4`)"
  - name: line1
    topic: "factory/line1/#"
    stream: {stream_b}
    partition_key: seq
""")
    expected: Counter[tuple[str, str, int]] = Counter()
    for seq in range(n):
        topic = factory_topic(seq)
        _, line, machine, device = topic.split("/")
        expected[(stream_a, f"device{seq % 7}", seq)] += 1
        if machine == "welder":
            expected[(stream_b, device, seq)] += 1
        if line == "line1":
            expected[(stream_b, str(seq), seq)] += 1

    gw = gateway_process(routes)
    started = time.monotonic()
    pub = publisher(topic_for=factory_topic)
    pub.publish_range(n)
    assert pub.wait_acked(60), f"broker did not PUBACK {len(pub.unacked)} messages"
    assert wait_until(lambda: gw.metric("records_put_total") >= sum(expected.values()), 120), (
        f"gateway put {gw.metric('records_put_total'):.0f} of {sum(expected.values())} records\n"
        f"{gw.output_tail()}")
    elapsed = time.monotonic() - started

    records_a, records_b = read_all(kinesis, stream_a), read_all(kinesis, stream_b)
    got: Counter[tuple[str, str, int]] = Counter()
    for stream, records in ((stream_a, records_a), (stream_b, records_b)):
        for r in records:
            for seq in seqs_in(r["data"]):
                got[(stream, r["partition_key"], seq)] += 1
    report = check_delivery(pub.acked, records_a, sent=n)  # every message lands once on stream A
    missing, unexpected = expected - got, got - expected
    emit("overlapping-routes", f"{report} | records expected={sum(expected.values())} "
         f"received={sum(got.values())} (A={len(records_a)} B={len(records_b)}) "
         f"missing={sum(missing.values())} unexpected_or_duplicate={sum(unexpected.values())} "
         f"duration={elapsed:.1f}s")
    report.assert_no_loss()
    assert not missing, f"missing (stream, key, seq), first: {list(missing)[:10]}"
    assert not unexpected, \
        f"unexpected or duplicated (stream, key, seq), first: {list(unexpected)[:10]}"
    assert report.duplicates == 0 and report.foreign == 0
    assert gw.metric("messages_unrouted_total") == 0
    assert gw.alive


# --- 2. kill -9 mid-stream, restart with the same client id -------------------------------------

@pytest.mark.timeout(180)
def test_kill_9_mid_stream_then_restart_loses_nothing(
        tmp_path: Path, kinesis_stream: str, kinesis: Any, mosquitto: Mosquitto,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    n = 6000
    kill_at = random.Random(3).randint(n // 5, n // 2)  # records in Kinesis when the kill lands
    gw = gateway_process(single_route(tmp_path, kinesis_stream), client_id="gw-kill9")
    started = time.monotonic()
    pub = publisher(topic_for=lambda seq: f"welder/{seq % 5}/data")
    sender = pub.publish_in_background(n, rate=1500)
    assert wait_until(lambda: gw.metric("records_put_total") >= kill_at, 60, poll_s=0.05), \
        gw.output_tail()
    held = gw.metric("backlog_records")
    gw.kill()  # SIGKILL: no drain, unacked messages stay in the broker's session
    in_kinesis_at_kill = len(read_all(kinesis, kinesis_stream))
    gw.start().wait_ready()
    sender.join(60)
    assert pub.wait_acked(60), f"broker did not PUBACK {len(pub.unacked)} messages"
    report, records = wait_delivered(kinesis, kinesis_stream, pub.acked, n, timeout=90)
    elapsed = time.monotonic() - started
    emit("kill-9-restart", f"{report} | killed with {in_kinesis_at_kill} records in Kinesis and "
         f"{held:.0f} held in the gateway; duration={elapsed:.1f}s")
    report.assert_no_loss()
    assert report.received_unique == n
    sessions = [e for e in gw.logs() if "session_present=True" in str(e.get("message", e.get("raw")))]
    assert sessions, "the restarted gateway did not resume its persistent session"
    assert gw.alive


# --- 3. Kinesis unreachable for 30 s ------------------------------------------------------------

@pytest.mark.timeout(240)
def test_kinesis_outage_of_30s_acks_nothing_keeps_memory_flat_and_loses_nothing(
        tmp_path: Path, kinesis_stream: str, kinesis: Any, mosquitto: Mosquitto,
        fault_proxy: FaultProxy, gateway_process: Callable[..., GatewayProcess],
        publisher: Callable[..., Publisher]) -> None:
    rate, publish_s, outage_s = 80, 45, 30.0
    n = rate * publish_s
    gw = gateway_process(single_route(tmp_path, kinesis_stream), kinesis_url=fault_proxy.url,
                         client_id="gw-outage")
    proc = psutil.Process(gw.pid)
    started = time.monotonic()
    pub = publisher(topic_for=lambda seq: f"welder/{seq % 5}/data")
    sender = pub.publish_in_background(n, rate=rate)
    assert wait_until(lambda: gw.metric("records_put_total") >= 2 * rate, 30), gw.output_tail()

    fault_proxy.down("reset")  # every request, on new and kept-alive connections, gets an RST
    outage_started = time.monotonic()
    # A PutRecords already forwarded when the outage began may still complete: wait until the
    # count holds still for one poll (at most 5 s), then nothing may change until the end.
    put_base = gw.metric("records_put_total")
    while time.monotonic() < outage_started + 5:
        time.sleep(0.5)
        put_base, previous = gw.metric("records_put_total"), put_base
        if put_base == previous:
            break
    acks_base = mosquitto.pubacks_from("gw-outage")
    kinesis_base = len(read_all(kinesis, kinesis_stream))
    rss_base = rss_max = proc.memory_info().rss
    liveness: set[int] = set()
    readiness: set[int] = set()
    puts_during: set[float] = set()
    while time.monotonic() < outage_started + outage_s:
        rss_max = max(rss_max, proc.memory_info().rss)
        puts_during.add(gw.metric("records_put_total"))
        liveness.add(gw.http_get("/healthz")[0])
        readiness.add(gw.http_get("/readyz")[0])
        time.sleep(0.5)
    acks_during = mosquitto.pubacks_from("gw-outage") - acks_base
    kinesis_during = len(read_all(kinesis, kinesis_stream)) - kinesis_base
    held_at_end = gw.metric("backlog_records")
    published_by_end = len(pub.sent)
    fault_proxy.pass_through()
    recovered_at = time.monotonic()

    sender.join(60)
    assert pub.wait_acked(60), f"broker did not PUBACK {len(pub.unacked)} messages"
    report, _ = wait_delivered(kinesis, kinesis_stream, pub.acked, n, timeout=90)
    caught_up = time.monotonic() - recovered_at
    elapsed = time.monotonic() - started
    mib = 1024 * 1024
    emit("kinesis-outage-30s", f"{report} | outage {outage_s:.0f}s at {rate} msg/s: "
         f"gateway PUBACKs during={acks_during} records_put during={sorted(puts_during)} "
         f"new Kinesis records during={kinesis_during} published by its end={published_by_end} "
         f"held unacked in the gateway={held_at_end:.0f} (the rest queued by the broker) "
         f"RSS start={rss_base / mib:.1f}MiB max={rss_max / mib:.1f}MiB "
         f"(+{(rss_max - rss_base) / mib:.1f}MiB) /healthz={sorted(liveness)} "
         f"/readyz={sorted(readiness)} caught up {caught_up:.1f}s after recovery; "
         f"duration={elapsed:.1f}s")
    assert acks_base > 0, "no gateway PUBACK seen in the broker log before the outage"
    assert acks_during == 0, "the gateway acknowledged messages while Kinesis was unreachable"
    assert 503 in readiness, "readiness must report the unreachable Kinesis"
    assert puts_during == {put_base} and kinesis_during == 0
    # The gateway holds at most its Receive Maximum unacked; the broker's session keeps the rest.
    assert held_at_end > 0, "no message reached the gateway during the outage"
    assert not mosquitto.dropped_messages_logged()
    assert rss_max - rss_base < 30 * mib
    assert liveness == {200}, "liveness must not depend on Kinesis"
    report.assert_no_loss()
    assert report.received_unique == n
    assert wait_until(lambda: mosquitto.pubacks_from("gw-outage") >= n, 30), \
        "the gateway did not acknowledge every message after the recovery"
    assert gw.alive


# --- 4. partial failures: only the failed entries are resent ------------------------------------

@pytest.mark.timeout(180)
def test_partial_throttling_resends_only_failed_entries(
        tmp_path: Path, kinesis_stream: str, kinesis: Any, mosquitto: Mosquitto,
        fault_proxy: FaultProxy, gateway_process: Callable[..., GatewayProcess],
        publisher: Callable[..., Publisher]) -> None:
    n = 3000
    fault_proxy.partial(0.3, seed=11)
    gw = gateway_process(single_route(tmp_path, kinesis_stream), kinesis_url=fault_proxy.url,
                         client_id="gw-partial")
    started = time.monotonic()
    pub = publisher(topic_for=lambda seq: f"welder/{seq % 5}/data")
    pub.publish_range(n)
    assert pub.wait_acked(60), f"broker did not PUBACK {len(pub.unacked)} messages"
    report, records = wait_delivered(kinesis, kinesis_stream, pub.acked, n, timeout=120)
    elapsed = time.monotonic() - started
    written = Counter(seq for e in fault_proxy.entries_log for seq in seqs_in(e["data"]))
    written_twice = sorted(s for s, c in written.items() if c > 1)
    failed, retried = fault_proxy.counts["entries:failed"], gw.metric("records_retried_total")
    partial_requests = fault_proxy.counts["PutRecords:partial"]
    emit("partial-throttling-30pct", f"{report} | PutRecords requests={partial_requests} "
         f"entries failed by the proxy={failed} resent by the gateway={retried:.0f} "
         f"entries written={fault_proxy.counts['entries:written']} "
         f"written twice={len(written_twice)} duration={elapsed:.1f}s")
    report.assert_no_loss()
    assert failed > 0.2 * n, "the proxy did not inject the partial failures"
    assert retried == failed, "the gateway must resend exactly the failed entries"
    assert not written_twice, f"seqs written more than once: {written_twice[:20]}"
    assert set(written) == set(range(n)) and report.duplicates == 0
    assert gw.alive
