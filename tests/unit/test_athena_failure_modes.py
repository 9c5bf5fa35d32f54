"""What goes wrong between MQTT and Athena without the right settings, shown with the stand-ins.

Each test makes records with the gateway's own routing code (a route file, ``RouteTable.route``),
hands them to the Firehose/Glue/Athena stand-ins of tests.support.athena_shape with the stack
resolved from the template, and shows the failure the settings prevent: records with no newline
between them, a pretty-printed payload, a field whose type changes, a field the table lacks.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from gateway.model import Message, Record
from gateway.routefile.loader import load_routes_text
from tests.support.athena_shape import (
    WELDER_COLUMNS,
    GlueTable,
    UserRecord,
    athena,
    column_parameters,
    deliver,
    record_problems,
    rows,
)
from tests.support.cfn import Stack, load_template

TOPIC = "factory/line1/welder/w7"
ARRIVAL = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
QUERY = 'SELECT name, sensor_1 FROM "mqtt_telemetry"."readings" ORDER BY name'


def readings(n: int = 3) -> list[dict[str, Any]]:
    return [{"name": f"w{i}", "model": "welder", "status": "running", "sensor_1": 20.5 + i, "sensor_2": 1.0,
             "sensor_3": 2.0, "sensor_4": 3.0, "sensor_5": 4.0, "sensor_6": 5.0} for i in range(n)]


def records_of(route_options: str, payloads: list[bytes]) -> list[UserRecord]:
    """What the gateway writes for ``payloads`` on a route with ``route_options``."""
    text = (f"version: 1\nroutes:\n  - name: welders\n    topic: 'factory/#'\n    stream: s\n"
            f"    partition_key: name\n{route_options}")
    result = load_routes_text(text, "routes.yaml")
    assert result.table is not None, [f.format_text() for f in result.findings]
    out: list[UserRecord] = []
    for payload in payloads:
        (record,) = result.table.route(Message(TOPIC, payload, 1, 1741944413000))
        assert isinstance(record, Record), record
        out.append(UserRecord(record.data, ARRIVAL))
    return out


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template()


def json_stack(template: dict[str, Any]) -> Stack:
    """The payload as is, delivered as JSON lines: the case where the separator is the user's to set."""
    return Stack(template, {"RecordFormat": "JSON", **column_parameters(WELDER_COLUMNS)})


def test_records_with_no_newline_run_together_into_one_unreadable_line(
        template: dict[str, Any], tmp_path: Path) -> None:
    payloads = [json.dumps(r).encode() for r in readings()]
    deliver(records_of("", payloads), json_stack(template), tmp_path / "bare")
    (obj,) = (tmp_path / "bare").rglob("*.json")
    assert obj.read_bytes().count(b"\n") == 0 and obj.read_bytes().count(b"}{") == 2
    with pytest.raises(duckdb.InvalidInputException, match="unexpected content after document"):
        rows(athena(tmp_path / "bare", json_stack(template), parquet=False), QUERY)

    deliver(records_of("    append_newline: true\n", payloads), json_stack(template), tmp_path / "lines")
    got = rows(athena(tmp_path / "lines", json_stack(template), parquet=False), QUERY)
    assert got == [{"name": r["name"], "sensor_1": r["sensor_1"]} for r in readings()]


def test_a_pretty_printed_payload_spans_lines_unless_append_newline_compacts_it(
        template: dict[str, Any], tmp_path: Path) -> None:
    pretty = [json.dumps(r, indent=2).encode() for r in readings()]
    stack = json_stack(template)
    newline_only = [UserRecord(p + b"\n", ARRIVAL) for p in pretty]   # a newline appended, nothing more
    deliver(newline_only, stack, tmp_path / "spread")
    with pytest.raises(duckdb.InvalidInputException):
        rows(athena(tmp_path / "spread", stack, parquet=False), QUERY)

    expected = [{"name": r["name"], "sensor_1": r["sensor_1"]} for r in readings()]
    for label, options in (("append-newline", "    append_newline: true\n"),
                           ("transform", "    transform: '@'\n    append_newline: true\n")):
        records = records_of(options, pretty)
        assert all(r.data.count(b"\n") == 1 for r in records)
        deliver(records, stack, tmp_path / label)
        assert rows(athena(tmp_path / label, stack, parquet=False), QUERY) == expected, label


def test_a_field_whose_type_changes_goes_to_the_error_prefix_not_the_table(
        template: dict[str, Any], tmp_path: Path) -> None:
    changed = readings()
    changed[1]["sensor_1"] = "n/a"   # a sensor that reports text once
    stack = Stack(template, column_parameters(WELDER_COLUMNS))   # Parquet
    records = records_of("    append_newline: true\n", [json.dumps(r).encode() for r in changed])
    failed = deliver(records, stack, tmp_path)
    assert failed == [records[1].data]
    assert rows(athena(tmp_path, stack), QUERY) == [{"name": "w0", "sensor_1": 20.5}, {"name": "w2", "sensor_1": 22.5}]
    assert record_problems(changed[1], GlueTable.of(stack)) == [
        "field 'sensor_1' = 'n/a' does not fit column type double"]


def test_a_field_the_table_lacks_is_dropped_without_a_word(template: dict[str, Any], tmp_path: Path) -> None:
    extended = [{**r, "firmware": "2.1"} for r in readings()]
    stack = Stack(template, column_parameters(WELDER_COLUMNS))
    records = records_of("    append_newline: true\n", [json.dumps(r).encode() for r in extended])
    assert deliver(records, stack, tmp_path) == []
    con = athena(tmp_path, stack)
    assert "firmware" not in [d[0] for d in con.execute('SELECT * FROM "mqtt_telemetry"."readings"').description]
    assert len(rows(con, QUERY)) == 3
    assert record_problems(extended[0], GlueTable.of(stack)) == [
        "field 'firmware' is not a column of readings (Firehose would drop it)"]


def test_dynamic_partitioning_sends_records_without_a_route_field_to_the_error_prefix(
        template: dict[str, Any], tmp_path: Path) -> None:
    stack = Stack(template, {"DynamicPartitioning": "Enabled", **column_parameters(WELDER_COLUMNS)})
    payloads = [json.dumps(r).encode() for r in readings()]
    assert len(deliver(records_of("    append_newline: true\n", payloads), stack, tmp_path / "plain")) == 3
    with_route = records_of("    transform: \"merge(@, {route: 'welders'})\"\n    append_newline: true\n", payloads)
    assert deliver(with_route, stack, tmp_path / "routed") == []
    assert [p.relative_to(tmp_path / "routed").parent.as_posix() for p in (tmp_path / "routed").rglob("*.parquet")] \
        == ["data/route=welders/dt=2025-03-14"]
    assert rows(athena(tmp_path / "routed", stack), 'SELECT DISTINCT route, dt FROM "mqtt_telemetry"."readings"') \
        == [{"route": "welders", "dt": "2025-03-14"}]
