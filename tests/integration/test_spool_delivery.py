"""The spool with real processes: mosquitto, moto over HTTP (behind the fault proxy), the gateway.

Each test states what the spool promises (docs/spool.md): a message is acknowledged once its
records are on disk, whatever Kinesis does; what is spooled survives a restart and goes first; a
full spool either stops the acks (block) or keeps the newest (drop_oldest), counted exactly.
Kept small and fast: the long outage, kill -9 series and disk-full runs are acceptance tests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.gatewayproc import GatewayProcess, write_routes
from tests.support.oracle import emit, seqs_in, wait_delivered, wait_until
from tests.support.publisher import Publisher
from tests.support.services import Mosquitto, read_all

pytestmark = pytest.mark.integration


def routes(tmp_path: Path, stream: str, qos: int = 1, name: str = "welders", topic: str = "welder/#") -> Path:
    return write_routes(tmp_path / "routes.yaml", f"""\
version: 1
routes:
  - name: {name}
    topic: "{topic}"
    stream: {stream}
    partition_key: name
    qos: {qos}
""")


def spool_env(spool: Path, **more: str) -> dict[str, str]:
    return {"GATEWAY_SPOOL_DIR": str(spool), "KINESIS_RETRY_CAP_MS": "1000", **more}


def outage(proxy: FaultProxy, gw: GatewayProcess) -> float:
    """Take Kinesis away; wait until a request already on its way has settled. The put count then."""
    proxy.down("reset")
    base = gw.metric("records_put_total")
    for _ in range(10):
        time.sleep(0.3)
        base, previous = gw.metric("records_put_total"), base
        if base == previous:
            break
    return base


@pytest.mark.timeout(120)
def test_messages_acked_while_kinesis_is_unreachable_are_all_in_kinesis_after_it_returns(
        tmp_path: Path, kinesis_stream: str, kinesis: Any, mosquitto: Mosquitto, fault_proxy: FaultProxy,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    n = 3000
    gw = gateway_process(routes(tmp_path, kinesis_stream), kinesis_url=fault_proxy.url, client_id="gw-spool-a",
                         extra_env=spool_env(tmp_path / "spool"))
    put_base = outage(fault_proxy, gw)
    pub = publisher(topic_for=lambda seq: f"welder/{seq % 5}/data")
    started = time.monotonic()
    pub.publish_range(n)
    assert pub.wait_acked(60)
    assert wait_until(lambda: mosquitto.pubacks_from("gw-spool-a") >= n, 30), \
        f"the gateway acknowledged {mosquitto.pubacks_from('gw-spool-a')} of {n} during the outage\n{gw.output_tail()}"
    acked_in = time.monotonic() - started
    assert gw.metric("records_put_total") == put_base, "Kinesis took records during the outage?"
    assert wait_until(lambda: gw.metric("spool_records") >= n, 10), gw.output_tail()
    commits = gw.metric("spool_commit_duration_seconds_count")
    fault_proxy.pass_through()
    recovered = time.monotonic()
    report, _ = wait_delivered(kinesis, kinesis_stream, pub.acked, n, timeout=60)
    drained_in = time.monotonic() - recovered
    assert wait_until(lambda: gw.metric("spool_records") == 0, 20), gw.output_tail()
    emit("spool-outage", f"{report} | {n} acked in {acked_in:.2f}s with Kinesis down, {commits:.0f} group commits "
         f"({n / max(commits, 1):.0f} msg/commit), drained in {drained_in:.1f}s")
    report.assert_no_loss()
    assert commits < n / 5, f"{commits:.0f} commits for {n} messages: not group commits"
    assert gw.alive


@pytest.mark.timeout(120)
def test_a_restart_with_a_non_empty_spool_delivers_the_spooled_records_first(
        tmp_path: Path, kinesis_stream: str, kinesis: Any, mosquitto: Mosquitto, fault_proxy: FaultProxy,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    old, new = 500, 200
    env = spool_env(tmp_path / "spool", GATEWAY_SHUTDOWN_TIMEOUT_S="2")
    gw = gateway_process(routes(tmp_path, kinesis_stream), kinesis_url=fault_proxy.url, client_id="gw-spool-b",
                         extra_env=env)
    outage(fault_proxy, gw)
    pub = publisher(topic_for=lambda seq: f"welder/{seq % 5}/data")
    pub.publish_range(old)
    assert pub.wait_acked(30), gw.output_tail()
    assert wait_until(lambda: gw.metric("spool_records") >= old, 10)
    gw.terminate()
    shutdown = [e for e in gw.logs() if "stopped" in str(e.get("message", ""))]
    assert shutdown and "in the spool" in str(shutdown[-1]["message"]), shutdown
    fault_proxy.pass_through()
    gw.start().wait_ready()
    pub.publish_range(range(old, old + new))
    assert pub.wait_acked(30), gw.output_tail()
    report, records = wait_delivered(kinesis, kinesis_stream, pub.acked, old + new, timeout=60)
    order = [seq for r in records for seq in seqs_in(r["data"])]
    first_new = min(i for i, seq in enumerate(order) if seq >= old)
    emit("spool-restart-first", f"{report} | {old} spooled before the restart, {new} after; first new record at "
         f"position {first_new}")
    report.assert_no_loss()
    assert set(order[:old]) == set(range(old)), "records received after the restart overtook the spooled ones"


@pytest.mark.timeout(120)
def test_qos0_messages_spooled_during_an_outage_survive_a_restart(
        tmp_path: Path, kinesis_stream: str, kinesis: Any, mosquitto: Mosquitto, fault_proxy: FaultProxy,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    n = 400
    gw = gateway_process(routes(tmp_path, kinesis_stream, qos=0), kinesis_url=fault_proxy.url,
                         client_id="gw-spool-c", extra_env=spool_env(tmp_path / "spool"))
    outage(fault_proxy, gw)
    pub = publisher(qos=0, topic_for=lambda seq: f"welder/{seq % 5}/data")
    pub.publish_range(n, rate=1000)
    assert wait_until(lambda: gw.metric("spool_records") >= n, 20), \
        f"{gw.metric('spool_records'):.0f} of {n} spooled\n{gw.output_tail()}"
    gw.kill()   # the hardest restart: nothing is drained, nothing flushed
    fault_proxy.pass_through()
    gw.start().wait_ready()
    report, _ = wait_delivered(kinesis, kinesis_stream, set(range(n)), n, timeout=60)
    emit("spool-qos0-restart", f"{report} | {n} QoS 0 messages spooled during an outage, then kill -9 and restart")
    report.assert_no_loss()


@pytest.mark.timeout(150)
def test_block_a_full_spool_stops_acks_and_reading_and_resumes_when_it_drains(
        tmp_path: Path, kinesis_stream: str, kinesis: Any, mosquitto: Mosquitto, fault_proxy: FaultProxy,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    capacity = 16 * 1024 * 1024
    pad = "x" * 60_000
    fits = capacity // len(pad)   # an upper bound: a row is its JSON plus its key, topic and overhead
    n = fits + 150
    gw = gateway_process(routes(tmp_path, kinesis_stream, topic="big/#"), kinesis_url=fault_proxy.url,
                         client_id="gw-spool-d",
                         extra_env=spool_env(tmp_path / "spool", GATEWAY_SPOOL_MAX_BYTES=str(capacity)))
    outage(fault_proxy, gw)
    pub = publisher(topic="big/1", payload=lambda seq: json.dumps({"name": "d", "seq": seq, "pad": pad}).encode())
    pub.publish_in_background(n)
    assert wait_until(lambda: gw.metric("spool_bytes") > capacity * 0.9, 30), gw.output_tail()
    time.sleep(2)   # the scenario: the spool stays full while Kinesis is away
    acked_full = mosquitto.pubacks_from("gw-spool-d")
    held, received = gw.metric("spool_records"), gw.metric("messages_received_total")
    time.sleep(2)
    assert mosquitto.pubacks_from("gw-spool-d") == acked_full, "the gateway acknowledged while its spool was full"
    assert gw.metric("messages_received_total") == received, "the gateway read on while its spool was full"
    assert acked_full < n and held <= fits, (acked_full, held)
    assert any("GATEWAY_SPOOL_WHEN_FULL=block" in str(e.get("message", "")) for e in gw.logs())
    fault_proxy.pass_through()
    assert pub.wait_acked(30)
    assert wait_until(lambda: mosquitto.pubacks_from("gw-spool-d") >= n, 90), \
        f"{mosquitto.pubacks_from('gw-spool-d')} of {n} acknowledged after the spool drained\n{gw.output_tail()}"
    report, _ = wait_delivered(kinesis, kinesis_stream, pub.acked, n, timeout=60)
    emit("spool-block", f"{report} | capacity {capacity} B: {acked_full} acked while full ({held:.0f} spooled), "
         f"the rest after the drain")
    report.assert_no_loss()
    assert report.received_unique == n


@pytest.mark.timeout(150)
def test_drop_oldest_keeps_the_newest_and_counts_every_dropped_record(
        tmp_path: Path, kinesis_stream: str, kinesis: Any, mosquitto: Mosquitto, fault_proxy: FaultProxy,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    capacity = 16 * 1024 * 1024
    pad = "y" * 60_000
    n = capacity // (len(pad) + 200) + 300
    gw = gateway_process(routes(tmp_path, kinesis_stream, topic="big/#"), kinesis_url=fault_proxy.url,
                         client_id="gw-spool-e",
                         extra_env=spool_env(tmp_path / "spool", GATEWAY_SPOOL_MAX_BYTES=str(capacity),
                                             GATEWAY_SPOOL_WHEN_FULL="drop_oldest"))
    outage(fault_proxy, gw)
    pub = publisher(topic="big/1", payload=lambda seq: json.dumps({"name": "d", "seq": seq, "pad": pad}).encode())
    pub.publish_range(n)
    assert pub.wait_acked(60), f"{len(pub.unacked)} not PUBACKed: drop_oldest must never block\n{gw.output_tail()}"
    fault_proxy.pass_through()
    assert wait_until(lambda: gw.metric("spool_records") == 0, 60), gw.output_tail()
    dropped = gw.metric("spool_dropped_total", route="welders", reason="when_full")
    taken_in = gw.metric("messages_received_total")   # n, plus any copy the broker sent again
    records = read_all(kinesis, kinesis_stream)
    delivered = {seq for r in records for seq in seqs_in(r["data"])}
    newest = set(range(n - 100, n))
    emit("spool-drop-oldest", f"sent={n} taken in={taken_in:.0f} delivered={len(records)} records "
         f"({len(delivered)} messages) dropped={dropped:.0f} (capacity {capacity} B)")
    assert dropped > 0
    assert newest <= delivered, f"newest lost: {sorted(newest - delivered)[:10]}"
    assert len(delivered) + dropped >= n, f"{n - len(delivered)} not delivered, {dropped:.0f} counted as dropped"
    # every message taken in is a record delivered or a drop counted (a copy sent again is one more)
    assert len(records) + dropped == taken_in, \
        f"{len(records)} delivered + {dropped:.0f} dropped != {taken_in:.0f} taken in ({n} sent)"
    assert any("GATEWAY_SPOOL_WHEN_FULL=drop_oldest" in str(e.get("message", "")) for e in gw.logs())



@pytest.mark.timeout(120)
def test_spooled_records_of_a_changed_route_still_go_to_the_stream_they_were_routed_to(
        tmp_path: Path, make_stream: Callable[..., str], kinesis: Any, mosquitto: Mosquitto, fault_proxy: FaultProxy,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    n = 300
    before, after = make_stream(suffix="-before"), make_stream(suffix="-after")
    route_file = routes(tmp_path, before)
    gw = gateway_process(route_file, kinesis_url=fault_proxy.url, client_id="gw-spool-reload",
                         extra_env=spool_env(tmp_path / "spool"))
    outage(fault_proxy, gw)
    pub = publisher(topic_for=lambda seq: f"welder/{seq % 5}/data")
    pub.publish_range(n)
    assert wait_until(lambda: gw.metric("spool_records") >= n, 20), gw.output_tail()
    routes(tmp_path, after, name="welders-renamed")   # the route is removed, a new one writes elsewhere
    assert wait_until(lambda: gw.metric("config_reloads_total", result="success") >= 2, 20), gw.output_tail()
    pub.publish_range(range(n, 2 * n))
    fault_proxy.pass_through()
    report_before, _ = wait_delivered(kinesis, before, set(range(n)), n, timeout=60)
    report_after, _ = wait_delivered(kinesis, after, set(range(n, 2 * n)), n, timeout=60)
    emit("spool-reload", f"routed before the reload: {report_before} | after: {report_after}")
    report_before.assert_no_loss()
    report_after.assert_no_loss()
