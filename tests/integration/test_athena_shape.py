"""From MQTT to Athena, end to end in shape: what is published is what the SQL query answers.

The gateway runs as a real process between mosquitto and the moto Kinesis endpoint. What it wrote
is read back and handed to the stand-ins of tests.support.athena_shape, configured from the
CloudFormation template resolved for the case's parameters: KPL aggregates unpacked, records
joined into S3 objects as Firehose joins them, converted to Parquet with the Glue table's schema,
and queried with DuckDB as Athena would query the table. Three cases: the payload as is (published
pretty-printed, so append_newline has to compact it), the example route file with its MQTT
metadata, and the same route aggregated, partitioned by route and delivered as JSON lines.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.athena_shape import (
    WELDER_COLUMNS,
    GlueTable,
    UserRecord,
    athena,
    column_parameters,
    deliver,
    rows,
    user_records,
)
from tests.support.cfn import ROOT, Stack, load_template
from tests.support.gatewayproc import GatewayProcess, write_routes
from tests.support.oracle import KPL_MAGIC, wait_until
from tests.support.publisher import Publisher
from tests.support.services import Mosquitto, read_all

pytestmark = pytest.mark.integration

EXAMPLE_ROUTES = (ROOT / "deploy" / "aws" / "example" / "routes.yaml").read_text(encoding="utf-8")
EXAMPLE_STREAM = "stream: arn:aws:kinesis:eu-west-1:123456789012:stream/mqtt-telemetry"
N = 40
PLAIN_ROUTES = """\
version: 1
routes:
  - name: welders
    topic: "factory/+/welder/#"
    stream: STREAM
    partition_key: name
    append_newline: true
"""


def reading(i: int) -> dict[str, Any]:
    return {"name": f"w{i % 5}", "model": "welder", "status": ("running", "idle")[i % 2],
            "sensor_1": 20 + i / 4, "sensor_2": i, "sensor_3": 16.1, "sensor_4": 0.9, "sensor_5": 5.5,
            "sensor_6": 100.32 + i}


def one_only(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def example_routes(stream: str, *, aggregated: bool = False) -> str:
    text = one_only(EXAMPLE_ROUTES, EXAMPLE_STREAM, f"stream: {stream}")
    if aggregated:   # the stack's AppendDelimiterToRecord adds the newline (JSON, dynamic partitioning)
        text = one_only(text, "    append_newline: true\n", "    aggregate: true\n")
    return text


CASES: dict[str, tuple[Callable[[str], str], dict[str, str], bool]] = {
    # name: (route file for a stream, stack parameters, publish pretty-printed)
    "payload-as-is": (lambda s: PLAIN_ROUTES.replace("STREAM", s), column_parameters(WELDER_COLUMNS), True),
    "metadata-envelope": (example_routes, {}, False),
    "aggregated": (lambda s: example_routes(s, aggregated=True),
                   {"DynamicPartitioning": "Enabled", "RecordFormat": "JSON", "GatewayAggregation": "true"}, False),
}


def properties(i: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("site", "plant-7")
    props.UserProperty = ("seq", str(i))
    props.ContentType = "application/json"
    return props


def publish(pub: Publisher, i: int, *, pretty: bool, retain: bool = False) -> dict[str, Any]:
    """Publish reading i (MQTT 5, QoS 1, user properties); returns what a row should hold."""
    topic = f"factory/line1/welder/w{i % 5}"
    payload = json.dumps(reading(i), indent=2 if pretty else None).encode()
    info = pub.client.publish(topic, payload, qos=1, retain=retain, properties=properties(i))
    info.wait_for_publish(10)
    return {**reading(i), "route": "welders", "topic": topic, "qos": 1, "retained": retain,
            "content_type": "application/json", "user_properties": {"site": "plant-7", "seq": str(i)}}


def as_row(expected: dict[str, Any], table: GlueTable, partition_names: set[str]) -> str:
    """A published message as the row the table should show (doubles as doubles), comparable text."""
    names = [n for n, _ in table.columns] + sorted(partition_names - {"dt"})
    row = {n: (float(expected[n]) if dict(table.columns).get(n) == "double" else expected.get(n)) for n in names}
    return json.dumps(row, sort_keys=True)


def wait_user_records(kinesis: Any, stream: str, count: int, timeout: float) -> tuple[list[dict[str, Any]],
                                                                                        list[UserRecord]]:
    got: dict[str, Any] = {"raw": [], "user": []}

    def enough() -> bool:
        got["raw"] = read_all(kinesis, stream)
        got["user"] = user_records(got["raw"])
        return len(got["user"]) >= count

    wait_until(enough, timeout, poll_s=0.5)
    return got["raw"], got["user"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_what_is_published_is_what_the_athena_query_answers(
        case: str, tmp_path: Path, make_stream: Callable[..., str], kinesis: Any, mosquitto: Mosquitto,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    route_file, parameters, pretty = CASES[case]
    stream = make_stream()
    stack = Stack(load_template(), parameters)
    table = GlueTable.of(stack)
    partition_names = {n for n, _ in table.partition_keys}
    pub = publisher()
    started_ms = int(time.time() * 1000)
    expected = [publish(pub, 0, pretty=pretty, retain=True)]   # from the retained store, on subscribe
    gw = gateway_process(write_routes(tmp_path / "routes.yaml", route_file(stream)))
    expected += [publish(pub, i, pretty=pretty) for i in range(1, N)]

    raw, records = wait_user_records(kinesis, stream, N, timeout=60)
    assert len(records) == N, f"{len(records)} of {N} records in Kinesis\n{gw.output_tail()}"
    if case == "aggregated":
        assert len(raw) < N and any(r["data"].startswith(KPL_MAGIC) for r in raw), "nothing was aggregated"
    failed = deliver(records, stack, tmp_path / "s3")
    assert failed == []
    finished_ms = int(time.time() * 1000)

    want = Counter(as_row(e, table, partition_names) for e in expected)
    sql = f'SELECT * FROM "{table.database}"."{table.name}"'
    for parquet in (True, False):   # the Parquet table, and the objects read line by line
        answer = rows(athena(tmp_path / "s3", stack, parquet=parquet), sql)
        if "received_at" in dict(table.columns):
            assert all(started_ms <= r["received_at"] <= finished_ms for r in answer)
            for r in answer:
                r["received_at"] = None
            want = Counter(json.dumps({**json.loads(w), "received_at": None}, sort_keys=True) for w in want)
        got = Counter(json.dumps({k: v for k, v in r.items() if k != "dt"}, sort_keys=True) for r in answer)
        assert got == want, f"parquet={parquet}: missing {list(want - got)[:3]}, unexpected {list(got - want)[:3]}"

    today = datetime.now(UTC).strftime("%Y-%m-%d")
    todays = [r for r in rows(athena(tmp_path / "s3", stack), sql) if r["dt"] == today]
    assert len(rows(athena(tmp_path / "s3", stack), stack.outputs["Query"])) == min(len(todays), 100)
    assert gw.alive
