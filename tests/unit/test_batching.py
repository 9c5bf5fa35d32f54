"""Batch cutting, the scheduler's choice of the next job, and the retry schedule, without a sink
around them: the scheduler is pure, so every case runs at whatever time the test names."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.model import PUT, Failed, Record, record_size
from gateway.sink.batching import Entry, SettlementBatch, StreamState
from gateway.sink.retry import backoff_delay
from gateway.sink.scheduler import Aggregate, LoadShardMap, Refuse, Scheduler, Send

MiB = 1024 * 1024


def entry(size: int, born: float = 0.0, token: object = None) -> Entry[object]:
    return Entry("k", b"x" * (size - 1), None, size, "r", token, born)


def loaded(*entries: Entry[object]) -> StreamState[object]:
    s: StreamState[object] = StreamState("s")
    s.requeue_front(list(entries), 0.0)
    return s


def scheduler(linger_s: float = 0.05, aggregate: tuple[str, ...] = ()) -> Scheduler[int]:
    return Scheduler(linger_s=linger_s, max_records=500, max_bytes=5 * MiB, max_record_bytes=MiB,
                     aggregate_routes=aggregate)


def rec(stream: str = "s", size: int = 10, route: str = "r", pk: str = "k") -> Record:
    return Record(route, stream, pk, b"x" * (size - len(pk.encode())), None, size)


def test_size_counts_data_plus_utf8_key_bytes() -> None:
    assert record_size("ü" * 3, b"12345") == 11
    assert record_size("k", b"12345") == 6


def test_record_at_the_stream_limit_is_queued_and_one_byte_more_is_refused_before_any_batch() -> None:
    s = scheduler()
    s.accept([(rec(size=MiB), 0), (rec(size=MiB + 1), 1)], now=1.0)
    job, _ = s.next_job(now=1.0)
    assert isinstance(job, Refuse)
    [(refused, failed, stream)] = job.refused
    assert (refused.token, failed, stream) == (1, Failed("record too large", permanent=True), "s")
    assert failed.code == "too_large"
    job, _ = s.next_job(now=2.0)
    assert isinstance(job, Send) and [e.token for e in job.batch] == [0]


def test_a_record_without_a_computed_size_is_measured_by_the_scheduler() -> None:
    s = scheduler()
    s.accept([(Record("r", "s", "é", b"x" * (MiB - 1)), 7)], now=0.0)  # size 0: not computed
    job, _ = s.next_job(now=0.0)
    assert isinstance(job, Refuse) and job.refused[0][0].size == MiB + 1


def test_cut_respects_record_count_and_byte_limits() -> None:
    s = loaded(*(entry(100) for _ in range(7)))
    assert len(s.cut(max_records=3, max_bytes=10_000)) == 3
    assert len(s.cut(max_records=500, max_bytes=250)) == 2
    assert s.pending_bytes == 200 and len(s.pending) == 2


def test_cut_always_takes_at_least_one_entry() -> None:
    s = loaded(entry(500))
    assert len(s.cut(max_records=500, max_bytes=100)) == 1


def test_due_retries_overtake_newer_records_in_their_original_order() -> None:
    s = loaded(entry(10, token="new"))
    s.delay(entry(10, token="late"), until=5.0)
    s.delay(entry(10, token="early"), until=2.0)
    assert s.release_due(now=1.0, ready_at=0.0) == 2.0
    assert s.release_due(now=5.0, ready_at=0.0) is None
    assert [e.token for e in s.pending] == ["early", "late", "new"]
    assert s.pending_bytes == 30


def test_a_batch_waits_for_the_linger_unless_a_drain_forces_it() -> None:
    s = scheduler(linger_s=0.05)
    s.accept([(rec(), 0)], now=1.0)
    assert s.next_job(now=1.01) == (None, pytest.approx(1.05))
    s.begin_drain()
    job, _ = s.next_job(now=1.01)
    assert isinstance(job, Send) and len(job.batch) == 1
    s.end_drain()


def test_a_full_batch_goes_at_once() -> None:
    s = scheduler(linger_s=10.0)
    s.accept([(rec(), i) for i in range(501)], now=1.0)
    job, _ = s.next_job(now=1.0)
    assert isinstance(job, Send) and len(job.batch) == 500
    assert s.next_job(now=1.0) == (None, 11.0)


def test_send_now_skips_the_linger_only_while_nothing_is_in_flight() -> None:
    s = scheduler(linger_s=10.0)
    s.accept([(rec("a"), 0), (rec("b"), 1)], now=0.0)
    s.send_now()
    first, _ = s.next_job(now=0.0)
    assert isinstance(first, Send)
    assert s.next_job(now=0.0) == (None, 10.0)  # a request is in flight: its answer frees the backlog
    s.done(first)
    second, _ = s.next_job(now=0.0)
    assert isinstance(second, Send) and second.stream.name == "b"
    s.done(second)
    assert s.next_job(now=0.0) == (None, None)  # everything went: the urgency is over
    s.accept([(rec("a"), 2)], now=0.0)
    assert s.next_job(now=0.0) == (None, 10.0)


def test_paused_streams_are_skipped_and_streams_take_turns() -> None:
    s = scheduler(linger_s=0.0)
    s.accept([(rec("a"), 0), (rec("b"), 1), (rec("c"), 2)], now=0.0)
    first, _ = s.next_job(now=1.0)
    assert isinstance(first, Send) and first.stream.name == "a"
    first.stream.paused_until = 9.0
    s.accept([(rec("a"), 3)], now=1.0)
    names = []
    for _ in range(2):
        job, _ = s.next_job(now=1.0)
        assert isinstance(job, Send)
        names.append(job.stream.name)
    assert names == ["b", "c"]
    assert s.next_job(now=1.0) == (None, 9.0)


def test_aggregating_routes_load_the_shard_map_once_then_aggregate() -> None:
    s = scheduler(linger_s=0.0, aggregate=("agg",))
    s.accept([(rec(route="agg"), 0), (rec(route="agg"), 1), (rec(route="plain"), 2)], now=0.0)
    load, _ = s.next_job(now=0.0)
    assert isinstance(load, LoadShardMap)
    plain, _ = s.next_job(now=0.0)   # plain records do not wait for the map
    assert isinstance(plain, Send) and [e.token for e in plain.batch] == [2]
    assert s.next_job(now=0.0) == (None, None)
    s.shard_map_loaded(load.stream, None)
    job, _ = s.next_job(now=0.0)
    assert isinstance(job, Aggregate) and [e.token for e in job.records] == [0, 1]


def test_settlement_batch_settles_every_member_of_an_aggregate_and_counts_by_code() -> None:
    aggregate: Entry[int] = Entry("k", b"", None, 1, "a", 1, 0.0, members=[("a", 1), ("b", 2), ("a", 3)])
    out: SettlementBatch[Any] = SettlementBatch()
    out.add(aggregate, PUT)
    out.add(entry(5, token=4), Failed("record too large", True, code="too_large"))
    assert out.settled == [(1, PUT), (2, PUT), (3, PUT), (4, Failed("record too large", True))]
    assert out.put == {"a": 2, "b": 1} and out.failed == {("r", "too_large"): 1}
    assert out.count == 4


class Fixed:
    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


def test_backoff_is_full_jitter_under_a_capped_exponential() -> None:
    ceilings = [backoff_delay(n, 0.1, 10.0, Fixed(1.0)) for n in range(10)]
    assert ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0])
    assert backoff_delay(3, 0.1, 10.0, Fixed(0.0)) == 0.0
    assert backoff_delay(10_000, 0.1, 10.0, Fixed(0.5)) == pytest.approx(5.0)


def test_records_that_arrive_after_send_now_wait_out_the_linger() -> None:
    s = scheduler(linger_s=10.0)
    s.accept([(rec("a"), 0)], now=0.0)
    s.send_now()                                  # e.g. the broker's window is full
    first, _ = s.next_job(now=0.0)
    assert isinstance(first, Send)
    s.accept([(rec("a"), 1)], now=0.1)            # a steady trickle goes on arriving
    s.done(first)
    assert s.next_job(now=0.1) == (None, 10.1)    # this one lingers: the urgency was for what was queued
