"""The benchmark's pure parts: what it counts as lost, duplicated or late, and what it publishes.

A wrong count here would make the benchmark report loss or duplicates the gateway never caused
(or hide real ones); a route file the loader rejects would stop every gateway run. No network,
no timing.
"""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest

from bench.publisher import RawPublisher, payload
from bench.readback import analyse, deaggregate
from bench.scenarios import route_file


def _record(recv_ns: int, seq: int, t: int) -> list[object]:
    data = orjson.dumps({"name": "device123", "seq": seq, "t": t}) + b"\n"
    return [recv_ns, "device123", base64.b64encode(data).decode()]


def test_analyse_counts_loss_duplicates_and_ignores_warm_up() -> None:
    records = [_record(2_000_000, -1, 0),            # warm-up: not part of the run
               _record(5_000_000, 0, 1_000_000),
               _record(9_000_000, 1, 1_000_000),
               _record(12_000_000, 1, 1_000_000)]    # seq 1 again; seq 2 never arrives
    d = analyse(records, expected=3)
    assert (d.unique, d.duplicates, d.lost, d.user_records) == (2, 1, 1, 3)
    assert d.complete_ns == 9_000_000                   # first arrival of the last distinct seq
    assert d.p50_ms == 4.0 and d.max_ms == 8.0           # latency from each seq's first arrival


def test_analyse_counts_undecodable_records_instead_of_failing() -> None:
    junk = [1, "k", base64.b64encode(b"not json").decode()]
    d = analyse([junk, _record(2, 0, 1)], expected=1)
    assert (d.undecodable, d.unique, d.lost) == (1, 1, 0)


def test_deaggregate_unpacks_kpl_and_passes_plain_records_through() -> None:
    agg = pytest.importorskip("aws_kinesis_agg.aggregator")
    aggregator = agg.RecordAggregator()
    for i in range(3):
        aggregator.add_user_record(f"pk{i}", b"r%d" % i)
    _pk, _ehk, data = aggregator.clear_and_get().get_contents()
    assert deaggregate(data) == [b"r0", b"r1", b"r2"]
    assert deaggregate(b'{"seq": 1}') == [b'{"seq": 1}']
    assert deaggregate(data[:-1] + b"\x00") == [data[:-1] + b"\x00"]   # bad MD5: not an aggregate


def test_published_packet_is_a_well_formed_mqtt_publish() -> None:
    pub = RawPublisher.__new__(RawPublisher)  # no socket: only the encoder is under test
    pub.qos, pub.sent = 1, 41
    topic = b"bench/site1/welder/device123"
    packet = pub.packet(len(topic).to_bytes(2, "big") + topic, seq=7, t_ns=123)
    assert packet[0] == 0x32                                     # PUBLISH, QoS 1
    length, i, shift = 0, 1, 0
    while True:
        length |= (packet[i] & 0x7F) << shift
        shift += 7
        i += 1
        if packet[i - 1] < 0x80:
            break
    body = packet[i:]
    assert len(body) == length
    assert body[2:2 + len(topic)] == topic
    assert int.from_bytes(body[2 + len(topic):4 + len(topic)], "big") == 42   # packet id
    doc = orjson.loads(body[4 + len(topic):])
    assert (doc["seq"], doc["t"], doc["name"], doc["model"]) == (7, 123, "device123", "welder")
    assert orjson.loads(payload(7, 123)) == doc


@pytest.mark.parametrize("extra, aggregate", [(0, False), (3, True)])
def test_bench_route_files_pass_the_gateways_own_loader(tmp_path: Path, extra: int, aggregate: bool) -> None:
    loader = pytest.importorskip("gateway.routefile.loader")
    result = loader.load_routes(route_file(tmp_path / "routes.yaml", qos=1, extra_routes=extra,
                                           aggregate=aggregate))
    assert result.table is not None, [f.format_text() for f in result.findings]
    assert len(result.table.routes) == 1 + extra
    assert result.table.routes[0].aggregate is aggregate
