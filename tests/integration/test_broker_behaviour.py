"""How the gateway copes with what brokers differ in, with real processes: mosquitto, moto, the gateway.

Overlapping filters on MQTT 5 (one copy per subscription from the broker, one record per route
from the gateway), retained messages a route skips, and the TLS ALPN protocol AWS IoT Core wants
on port 443 (against a local TLS listener that requires it).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.gatewayproc import GatewayProcess, write_routes
from tests.support.oracle import emit, seqs_in, wait_until
from tests.support.publisher import Publisher
from tests.support.services import Mosquitto, read_all

pytestmark = pytest.mark.integration


def _topic(seq: int) -> str:
    """Half match both filters, a quarter only factory/#, a quarter only +/+/welder/+/telemetry."""
    kind = seq % 4
    if kind < 2:
        return f"factory/line{seq % 3}/welder/d{seq % 7}/telemetry"
    if kind == 2:
        return f"factory/line{seq % 3}/press/d{seq % 7}/telemetry"
    return f"plant{seq % 5}/line{seq % 3}/welder/d{seq % 7}/telemetry"


@pytest.mark.timeout(240)
def test_overlapping_filters_on_mqtt5_give_one_record_per_route_per_message(
        tmp_path: Path, make_stream: Callable[..., str], kinesis: Any, mosquitto: Mosquitto,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    n = 5_000
    stream = make_stream()
    routes = write_routes(tmp_path / "routes.yaml", f"""\
version: 1
defaults:
  qos: 1
  stream: {stream}
routes:
  - name: everything
    topic: "factory/#"
    partition_key: "'everything'"
  - name: welders
    topic: "+/+/welder/+/telemetry"
    partition_key: "'welders'"
""")
    expected: Counter[tuple[str, int]] = Counter()
    for seq in range(n):
        topic = _topic(seq)
        if topic.startswith("factory/"):
            expected[("everything", seq)] += 1
        if "/welder/" in topic:
            expected[("welders", seq)] += 1
    gw = gateway_process(routes, extra_env={"MQTT_PROTOCOL": "5"})
    pub = publisher(topic_for=_topic)
    started = time.monotonic()
    pub.publish_range(n)
    assert pub.wait_acked(60), f"broker did not PUBACK {len(pub.unacked)} messages"
    assert wait_until(lambda: gw.metric("records_put_total") >= sum(expected.values()), 120), (
        f"gateway put {gw.metric('records_put_total'):.0f} of {sum(expected.values())}\n{gw.output_tail()}")
    time.sleep(1.0)   # copies the broker still had on the way would be written by now
    elapsed = time.monotonic() - started
    got: Counter[tuple[str, int]] = Counter()
    for record in read_all(kinesis, stream):
        for seq in seqs_in(record["data"]):
            got[(record["partition_key"], seq)] += 1
    missing, duplicates = expected - got, got - expected
    emit("overlapping-filters-mqtt5", f"messages={n} records expected={sum(expected.values())} "
         f"received={sum(got.values())} missing={sum(missing.values())} duplicates={sum(duplicates.values())} "
         f"duration={elapsed:.1f}s")
    assert not missing, f"missing (route, seq), first: {list(missing)[:10]}"
    assert not duplicates, f"duplicated (route, seq), first: {list(duplicates)[:10]}"
    assert "routed once, by its subscription identifiers" in gw.output_tail(100_000), \
        "mosquitto sent no second copies: the test did not exercise the overlap"
    assert gw.alive
