"""The routing core: one record per matching route, one parse per message, reasons for rejections."""

from __future__ import annotations

from unittest import mock

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.model import Message, Record, Rejected, Skipped
from gateway.routing import table as table_module
from gateway.routing.expressions import compile_expression as expr
from gateway.routing.table import Route, RouteTable

SEED = (b'{"name": "device123", "model": "welder", "status": "running", "sensor_1": 24.5, '
        b'"sensor_2": 98.3, "sensor_3": 16.1, "sensor_4": 0.9, "sensor_5": 5.5, "sensor_6": 100.32}')


def message(topic: str = "factory/line1/welder/w7", payload: bytes = SEED) -> Message:
    return Message(topic, payload, 1, 1700000000000)


def table(*routes: Route) -> RouteTable:
    return RouteTable(routes)


def test_seed_payload_keyed_by_name_keeps_the_payload_bytes() -> None:
    t = table(Route("welders", ("factory/+/welder/#",), "welder-telemetry", expr("name")))
    (record,) = t.route(message())
    assert record == Record("welders", "welder-telemetry", "device123", SEED, None, len(SEED) + 9)


def test_a_message_matching_k_routes_yields_k_records_from_one_parse() -> None:
    t = table(
        Route("a", ("factory/#",), "s1", expr("name")),
        Route("b", ("factory/+/welder/+",), "s2", expr("topic(`3`)")),
        Route("c", ("other/#",), "s3", expr("name")),
    )
    with mock.patch.object(table_module.orjson, "loads", wraps=orjson.loads) as loads:
        outcomes = t.route(message())
    assert [o.route for o in outcomes] == ["a", "b"]
    assert outcomes[1].partition_key == "welder"
    assert loads.call_count == 1


@pytest.mark.parametrize(
    ("key_expression", "payload", "reason"),
    [
        ("missing", SEED, "null"),
        ("`\"\"`", SEED, "empty"),
        ("@", SEED, "an object"),
        ("keys(@)", SEED, "an array"),
        ("name", b'{"name": "' + b"k" * 257 + b'"}', "257 characters"),
        ("name", b"not json", "payload is not JSON: invalid literal"),
        ("name", b'{"name": "\xff"}', "payload is not valid UTF-8 (byte 10"),
    ],
)
def test_unusable_partition_keys_are_rejected_with_the_reason(key_expression: str, payload: bytes, reason: str) -> None:
    t = table(Route("r", ("#",), "s", expr(key_expression)))
    (outcome,) = t.route(message(payload=payload))
    assert isinstance(outcome, Rejected) and reason in outcome.reason


def test_numbers_and_booleans_become_their_json_text() -> None:
    t = table(Route("n", ("#",), "s", expr("sensor_1")), Route("b", ("#",), "s", expr("`true`")))
    assert [o.partition_key for o in t.route(message())] == ["24.5", "true"]


def test_a_256_character_key_is_accepted() -> None:
    t = table(Route("r", ("#",), "s", expr("name")))
    (outcome,) = t.route(message(payload=b'{"name": "' + b"k" * 256 + b'"}'))
    assert isinstance(outcome, Record)


def test_filter_skips_and_transform_writes_compact_json() -> None:
    t = table(
        Route("hot", ("#",), "s", expr("name"), filter=expr("sensor_2 > `99`")),
        Route("slim", ("#",), "s", expr("name"), transform=expr("{name: name, t: sensor_1}"), append_newline=True),
    )
    skipped, record = t.route(message())
    assert skipped == Skipped("hot")
    assert record.data == b'{"name":"device123","t":24.5}\n'


def test_raw_routes_never_parse_the_payload() -> None:
    t = table(Route("raw", ("#",), "s", expr("topic(`1`)"), format="raw"))
    with mock.patch.object(table_module.orjson, "loads") as loads:
        (record,) = t.route(message(payload=b"\xff\xfe binary"))
    assert record.data == b"\xff\xfe binary" and loads.call_count == 0


@pytest.mark.parametrize(("value", "ok"), [("0", True), (str(2**128 - 1), True), (str(2**128), False),
                                           ("-1", False), ("01", False), ("1.5", False)])
def test_explicit_hash_key_must_be_a_decimal_in_range(value: str, ok: bool) -> None:
    t = table(Route("r", ("#",), "s", expr("name"), explicit_hash_key=expr(f"'{value}'")))
    (outcome,) = t.route(message())
    assert isinstance(outcome, Record) is ok


def test_legacy_table_is_the_seed_route_with_a_static_key() -> None:
    t = RouteTable.legacy("homeassistant/sensor/#", "kinesis-data-stream", "sensor-data", 0)
    (record,) = t.route(message("homeassistant/sensor/t", b"anything"))
    assert (record.stream, record.partition_key, record.data) == ("kinesis-data-stream", "sensor-data", b"anything")
    assert t.subscriptions == (("homeassistant/sensor/#", 0),)


def test_unmatched_topics_yield_nothing() -> None:
    assert table(Route("r", ("a/#",), "s", expr("name"))).route(message("b/c")) == []


def test_an_expression_that_fails_on_a_payload_rejects_without_quoting_it() -> None:
    t = table(Route("r", ("#",), "s", expr("abs(name)")), Route("ok", ("#",), "s", expr("name")))
    rejected, record = t.route(message())
    assert isinstance(rejected, Rejected) and "JMESPathTypeError" in rejected.reason
    assert "device123" not in rejected.reason
    assert isinstance(record, Record)


PRETTY = b'{\n  "name": "device123",\n  "sensor_1": 24.5,\n  "note": "caf\xc3\xa9"\n}\n'


@pytest.mark.parametrize("payload", [PRETTY, PRETTY.replace(b"\n", b"\r\n"), PRETTY.rstrip(), b"\n" + SEED])
def test_append_newline_writes_a_multi_line_json_payload_as_one_compact_line(payload: bytes) -> None:
    t = table(Route("lines", ("#",), "s", expr("name"), append_newline=True))
    (record,) = t.route(message(payload=payload))
    assert record.data.count(b"\n") == 1 and record.data.endswith(b"\n")
    assert orjson.loads(record.data) == orjson.loads(payload)
    assert record.size == len(record.data) + len("device123")


def test_append_newline_keeps_a_one_line_payload_byte_for_byte() -> None:
    t = table(Route("lines", ("#",), "s", expr("name"), append_newline=True))
    (record,) = t.route(message(payload=SEED))
    assert record.data == SEED + b"\n"
    (record,) = t.route(message(payload=SEED + b"\n"))
    assert record.data == SEED + b"\n"


def test_append_newline_never_rewrites_a_raw_payload() -> None:
    t = table(Route("raw", ("#",), "s", expr("topic(`1`)"), format="raw", append_newline=True))
    (record,) = t.route(message(payload=b"line 1\nline 2"))
    assert record.data == b"line 1\nline 2\n"


def test_metadata_reaches_the_transform_of_every_matching_route() -> None:
    envelope = expr("merge(@, {topic: topic(), qos: qos(), retained: retained(), content_type: content_type(), "
                    "site: user_property('site'), props: user_properties()})")
    t = table(Route("a", ("#",), "s", expr("name"), transform=envelope),
              Route("b", ("#",), "s", expr("user_property('site')")))
    m = Message("factory/line1/welder/w7", b'{"name": "d"}', 1, 5, retain=True,
                user_properties=(("site", "plant-7"),), content_type="application/json")
    a, b = t.route(m)
    assert orjson.loads(a.data) == {"name": "d", "topic": "factory/line1/welder/w7", "qos": 1, "retained": True,
                                    "content_type": "application/json", "site": "plant-7",
                                    "props": {"site": "plant-7"}}
    assert b.partition_key == "plant-7"


def test_a_utf8_byte_order_mark_is_accepted_and_left_out_of_the_record() -> None:
    t = table(Route("r", ("#",), "s", expr("name")))
    (record,) = t.route(message(payload=b'\xef\xbb\xbf{"name": "w7"}'))
    assert isinstance(record, Record) and record.partition_key == "w7" and record.data == b'{"name": "w7"}'


def test_a_lone_surrogate_escape_is_valid_json_and_accepted() -> None:
    t = table(Route("r", ("#",), "s", expr("site")), Route("k", ("#",), "s", expr("name")),
              Route("t", ("#",), "s", expr("site"), transform=expr("{n: name}")))
    payload = b'{"name": "bad \\ud800 name", "site": "s1"}'
    kept, bad_key, transformed = t.route(message(payload=payload))
    assert isinstance(kept, Record) and kept.data == payload
    assert isinstance(bad_key, Rejected) and "lone surrogate" in bad_key.reason
    assert isinstance(transformed, Record) and transformed.data == b'{"n":"bad \\ud800 name"}'


_KEYS = st.one_of(st.text(max_size=300), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False), st.booleans(), st.none(),
                  st.lists(st.integers(0, 9), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2))
_PAYLOADS = st.one_of(
    st.builds(lambda key, extra, crlf: orjson.dumps({"k": key, "x": extra}, option=orjson.OPT_INDENT_2 if crlf else 0),
              _KEYS, st.text(max_size=20), st.booleans()),
    st.builds(lambda key: b"\xef\xbb\xbf" + orjson.dumps({"k": key}), _KEYS),
    st.binary(max_size=40),
    st.sampled_from([b'{"k": "a"}\n', b'{"k": "a"}\r\n', b'{"k":\n"a"}\n', b"", b"\n"]),
)


@settings(max_examples=300, deadline=None)
@given(payload=_PAYLOADS, fmt=st.sampled_from(["json", "raw"]), newline=st.booleans(),
       key=st.sampled_from(["k", "`\"const\"`", "topic()", "topic(`2`)", "k.deeper"]))
def test_the_routes_specialised_at_load_time_give_exactly_what_route_apply_gives(
        payload: bytes, fmt: str, newline: bool, key: str) -> None:
    route = Route("r", ("a/#",), "s", expr(key), format=fmt, append_newline=newline)  # type: ignore[arg-type]
    m = Message("a/b", payload, 1, 1700000000000)
    document = table_module._decode(payload) if fmt == "json" else None
    table_module.CONTEXT.set(m.topic, m.received_ms, m)
    assert table(route).route(m) == [route.apply(m, document)]


def test_the_message_context_is_set_only_for_routes_whose_expressions_read_it() -> None:
    t = table(Route("plain", ("a/#",), "s", expr("name")))
    with mock.patch.object(table_module.CONTEXT, "set") as context_set:
        t.route(message("a/b"))
    assert context_set.call_count == 0
    t = table(Route("by-topic", ("a/#",), "s", expr("topic(`2`)")))
    (record,) = t.route(message("a/b"))
    assert record.partition_key == "b"
