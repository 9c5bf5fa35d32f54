"""Per-record limit checks, batch cutting and the retry schedule, without a sink around them."""

from __future__ import annotations

import pytest

from gateway.model import Failed, PUT
from gateway.sink.batching import Entry, Outcome, StreamState, check_record, find_job
from gateway.sink.retry import backoff_delay

MiB = 1024 * 1024


def entry(size: int, born: float = 0.0, token: object = None) -> Entry:
    return Entry("k", b"x" * (size - 1), None, size, "r", token, born)


def test_size_counts_data_plus_utf8_key_bytes() -> None:
    assert check_record("ü" * 3, b"12345", None, MiB) == (11, None)


def test_record_at_the_limit_passes_and_one_byte_more_is_too_large() -> None:
    assert check_record("k", b"x" * (MiB - 1), None, MiB) == (MiB, None)
    assert check_record("k", b"x" * MiB, None, MiB)[1].reason == "record too large"


@pytest.mark.parametrize("key", ["", "k" * 257, 7, None, "\ud800"])
def test_bad_partition_keys_are_named(key: object) -> None:
    assert check_record(key, b"x", None, MiB)[1].reason == "invalid partition key"


@pytest.mark.parametrize("ehk", ["0", "42", str(2**128 - 1)])
def test_decimal_hash_keys_in_range_pass(ehk: str) -> None:
    assert check_record("k", b"x", ehk, MiB)[1] is None


@pytest.mark.parametrize("ehk", ["", str(2**128), "-1", "1e5", "٣", " 1", 5, "00042"])
def test_bad_explicit_hash_keys_are_named(ehk: object) -> None:
    assert check_record("k", b"x", ehk, MiB)[1].reason == "invalid explicit hash key"


def test_non_bytes_data_is_refused() -> None:
    assert check_record("k", "text", None, MiB)[1].reason == "record data is not bytes"


def test_cut_respects_record_count_and_byte_limits() -> None:
    s = StreamState("s")
    for _ in range(7):
        s.append(entry(100))
    assert len(s.cut(max_records=3, max_bytes=10_000)) == 3
    assert len(s.cut(max_records=500, max_bytes=250)) == 2
    assert s.pending_bytes == 200 and len(s.pending) == 2


def test_cut_always_takes_at_least_one_entry() -> None:
    s = StreamState("s")
    s.append(entry(500))
    assert len(s.cut(max_records=500, max_bytes=100)) == 1


def test_due_retries_overtake_newer_records_in_their_original_order() -> None:
    s = StreamState("s")
    s.append(entry(10, token="new"))
    s.delay(entry(10, token="late"), until=5.0)
    s.delay(entry(10, token="early"), until=2.0)
    assert s.release_due(now=1.0, ready_at=0.0) == 2.0
    assert s.release_due(now=5.0, ready_at=0.0) is None
    assert [e.token for e in s.pending] == ["early", "late", "new"]
    assert s.pending_bytes == 30


def test_find_job_waits_for_linger_then_sends() -> None:
    s = StreamState("s")
    s.append(entry(10, born=1.0))
    job, _, wake = find_job([s], 0, now=1.01, linger=0.05, max_records=500, max_bytes=MiB, force=False)
    assert job is None and wake == pytest.approx(1.05)
    job, _, _ = find_job([s], 0, now=1.01, linger=0.05, max_records=500, max_bytes=MiB, force=True)
    assert job is not None and job[0] == "send" and len(job[2]) == 1


def test_find_job_skips_paused_streams_round_robin() -> None:
    paused, busy = StreamState("a"), StreamState("b")
    paused.append(entry(10))
    busy.append(entry(10))
    paused.paused_until = 9.0
    limits = {"linger": 0.0, "max_records": 500, "max_bytes": MiB, "force": True}
    job, nxt, _ = find_job([paused, busy], 0, now=1.0, **limits)
    assert job[1] is busy and nxt == 2
    job, _, wake = find_job([paused, busy], nxt, now=1.0, **limits)
    assert job is None and wake == 9.0


def test_outcome_settles_every_member_of_an_aggregate() -> None:
    aggregate = Entry("k", b"", None, 1, "r", None, 0.0, members=[("a", 1), ("b", 2), ("a", 3)])
    out = Outcome()
    out.add(aggregate, PUT)
    out.add(entry(5, token=4), Failed("record too large", True, "too_large"))
    assert out.settled == [(1, PUT), (2, PUT), (3, PUT), (4, Failed("record too large", True))]
    assert out.put == {"a": 2, "b": 1} and out.failed == {("r", "too_large"): 1}  # counted by the bounded code
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
