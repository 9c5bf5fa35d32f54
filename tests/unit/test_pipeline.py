"""The pipeline settles every part of a message exactly once, and no bad message goes unlogged."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.model import PUT, REASON_CODES, Failed, Message, Record
from gateway.pipeline.pipeline import Pipeline
from gateway.routing.expressions import compile_expression as expr
from gateway.routing.table import DeadLetter, Route, RouteTable
from gateway.source.acks import AckTracker


class Active:
    def __init__(self, table: RouteTable) -> None:
        self.current = table


class FakeSink:
    def __init__(self) -> None:
        self.entries: list[tuple[Record, Any]] = []
        self.puts = 0
        self.urgent = 0

    def put(self, entries: Any, *, now: bool = False) -> None:
        self.puts += 1
        self.entries.extend(entries)
        if now:
            self.send_now()

    def send_now(self) -> None:
        self.urgent += 1


class CountingMetrics:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
        return record


def build(*routes: Route) -> tuple[Pipeline, FakeSink, list[int], CountingMetrics]:
    acked: list[int] = []
    sink, metrics = FakeSink(), CountingMetrics()
    acks = AckTracker(SimpleNamespace(ack_many=lambda acks: acked.extend(mid for mid, _ in acks)))
    pipeline = Pipeline(Active(RouteTable(routes)), acks, metrics, make_sink=lambda _settled: sink, backlog_capacity=3)
    return pipeline, sink, acked, metrics


def message(payload: bytes = b'{"name": "d1"}', topic: str = "t/1") -> Message:
    return Message(topic, payload, 1, 0)


def test_a_message_is_acked_only_when_every_record_is_put() -> None:
    pipeline, sink, acked, _ = build(Route("a", ("t/#",), "s1", expr("name")), Route("b", ("t/+",), "s2", expr("name")))
    pipeline.intake(message(), mid=7, qos=1)
    pipeline.after_read()
    assert len(sink.entries) == 2 and pipeline.held == 2
    pipeline.settled([(sink.entries[0][1], PUT)])
    assert acked == []
    pipeline.settled([(sink.entries[1][1], PUT)])
    assert acked == [7] and pipeline.held == 0


def test_unrouted_and_filtered_messages_are_acked_at_once() -> None:
    pipeline, _, acked, metrics = build(Route("a", ("t/#",), "s", expr("name"), filter=expr("`false`")))
    pipeline.intake(message(topic="other"), mid=1, qos=1)
    pipeline.intake(message(), mid=2, qos=1)
    pipeline.flush()
    assert acked == [1, 2] and metrics.calls["unrouted"] == 1


def test_a_rejected_message_goes_to_the_dead_letter_stream_and_is_acked_when_it_is_held() -> None:
    route = Route("a", ("t/#",), "s", expr("name"), dead_letter=DeadLetter("kinesis", "dlq"))
    pipeline, sink, acked, metrics = build(route)
    pipeline.intake(message(b"not json"), mid=3, qos=1)
    ((record, token),) = sink.entries
    assert record.stream == "dlq" and b'"reason":"payload is not JSON: ' in record.data
    assert acked == []
    pipeline.settled([(token, PUT)])
    assert acked == [3] and metrics.calls["records_dead_lettered"] == 1


def test_a_record_kinesis_refuses_for_good_is_dead_lettered_then_acked() -> None:
    route = Route("a", ("t/#",), "s", expr("name"), dead_letter=DeadLetter("kinesis", "dlq"))
    pipeline, sink, acked, _ = build(route)
    pipeline.intake(message(), mid=4, qos=1)
    pipeline.after_read()
    pipeline.settled([(sink.entries[0][1], Failed("record too large", permanent=True))])
    assert sink.entries[1][0].stream == "dlq" and acked == []
    pipeline.settled([(sink.entries[1][1], PUT)])
    assert acked == [4]


def test_without_a_dead_letter_a_rejection_is_dropped_counted_logged_and_acked(caplog: pytest.LogCaptureFixture) -> None:
    pipeline, _, acked, metrics = build(Route("a", ("t/#",), "s", expr("name")))
    with caplog.at_level(logging.WARNING):
        for mid in (1, 2, 3):
            pipeline.intake(message(b"not json"), mid=mid, qos=1)
        pipeline.flush(everything=True)
    assert acked == [1, 2, 3] and metrics.calls["records_dropped"] == 3
    lines = [r.getMessage() for r in caplog.records]
    assert any("'a'" in line and "t/1" in line and "payload is not JSON" in line for line in lines)
    assert any(line.startswith("2 more message(s) of route 'a'") for line in lines)
    assert not any("not json" in line for line in lines)  # never the payload


def test_in_bulk_mode_records_reach_the_sink_in_one_put_per_hand_over() -> None:
    acked: list[int] = []
    sink = FakeSink()
    acks = AckTracker(SimpleNamespace(ack_many=lambda acks: acked.extend(mid for mid, _ in acks)))
    pipeline = Pipeline(Active(RouteTable((Route("a", ("t/#",), "s", expr("name")),))), acks,
                        CountingMetrics(), make_sink=lambda _settled: sink, backlog_capacity=10)
    for mid in (1, 2, 3):
        pipeline.intake(message(), mid=mid, qos=1)
    assert sink.puts == 0 and pipeline.held == 0        # nothing is held before the sink has it
    pipeline.hand_over()
    pipeline.hand_over()                                  # an empty outbox is not a put
    assert sink.puts == 1 and len(sink.entries) == 3 and pipeline.held == 3
    pipeline.settled([(token, PUT) for _, token in sink.entries])
    assert acked == [1, 2, 3] and pipeline.held == 0


def test_the_backlog_is_full_at_capacity_and_frees_as_records_settle() -> None:
    freed: list[int] = []
    sink = FakeSink()
    outbound = SimpleNamespace(wake=lambda: freed.append(pipeline.held))
    pipeline = Pipeline(Active(RouteTable((Route("a", ("t/#",), "s", expr("name")),))),
                        AckTracker(SimpleNamespace(ack_many=lambda acks: None)), CountingMetrics(),
                        make_sink=lambda _settled: sink, outbound=outbound, backlog_capacity=3)  # type: ignore[arg-type]
    for mid in range(3):
        pipeline.intake(message(), mid=mid, qos=1)
    pipeline.after_read()       # the source ends its read round
    assert pipeline.backlog_full()
    assert sink.urgent == 1      # a full backlog asks the sink not to wait out its linger
    pipeline.settled([(sink.entries[0][1], PUT)])
    pipeline.settled([(token, PUT) for _, token in sink.entries[1:]])
    assert not pipeline.backlog_full()
    assert freed == [2]          # told once, when the full backlog first had room


@pytest.mark.parametrize(("payload", "code"), [(b"not json", "not_json"),
                                               (b'{"name": "' + b"k" * 300 + b'"}', "key_too_long"),
                                               (b'{"name": null}', "key_missing"),
                                               (b'{"name": ""}', "key_empty"),
                                               (b'{"name": [1]}', "key_type")])
def test_rejections_carry_a_bounded_metric_code_whatever_their_wording(payload: bytes, code: str) -> None:
    table = RouteTable((Route("a", ("t/#",), "s", expr("name")),))
    (outcome,) = table.route(Message("t/1", payload, 1, 0))
    assert outcome.code == code and code in REASON_CODES
