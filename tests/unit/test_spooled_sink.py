"""SpooledSink and its sender with a scripted store and inner sink: no threads, no sleeps, a fake clock.

The committer and the sender are driven by hand (``commit_once``, ``sender.step``), so each test
states exactly which commit or read happens when.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from gateway.model import PUT, Failed, Message, Record, Settlement, dead_letter_envelope
from gateway.spool.pacing import Pacer
from gateway.spool.schema import SpooledRecord, SpoolRow, SpoolUnavailable, row_size
from gateway.spool.spooled import SpooledSink
from gateway.spool.store import SpoolFull


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """The SpoolStore contract in memory; ``fail`` makes the next writes raise."""

    def __init__(self, capacity: int = 10**9, when_full: str = "block") -> None:
        self.rows: dict[int, SpooledRecord] = {}
        self.next_id = 1
        self.capacity_bytes = capacity
        self.when_full = when_full
        self.fail: Exception | None = None
        self.appends: list[int] = []
        self.deleted: list[int] = []
        self.replaced: list[tuple[list[int], list[SpoolRow]]] = []
        self.dropped: Counter[str] = Counter()

    @property
    def records(self) -> int:
        return len(self.rows)

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.rows.values())

    def _add(self, rows: Sequence[SpoolRow]) -> list[int]:
        ids = []
        for row in rows:
            self.rows[self.next_id] = SpooledRecord(self.next_id, row, row_size(row))
            ids.append(self.next_id)
            self.next_id += 1
        return ids

    def append(self, rows: Sequence[SpoolRow], sizes: Sequence[int] | None = None) -> list[int]:
        assert sizes is None or list(sizes) == [row_size(row) for row in rows]
        if self.fail is not None:
            raise self.fail
        needed = sum(row_size(r) for r in rows)
        if self.when_full == "block" and self.bytes + needed > self.capacity_bytes:
            raise SpoolFull("spool x: full")
        while self.when_full == "drop_oldest" and self.rows and self.bytes + needed > self.capacity_bytes:
            oldest = min(self.rows)
            self.dropped[self.rows.pop(oldest).row.route] += 1
        self.appends.append(len(rows))
        return self._add(rows)

    @property
    def drops_oldest(self) -> bool:
        return self.when_full == "drop_oldest"

    def take_dropped(self) -> dict[str, int]:
        taken, self.dropped = dict(self.dropped), Counter()
        return taken

    def read(self, after_id: int, max_records: int, max_bytes: int) -> list[SpooledRecord]:
        out: list[SpooledRecord] = []
        total = 0
        for row_id in sorted(self.rows):
            record = self.rows[row_id]
            if row_id <= after_id:
                continue
            if len(out) >= max_records or (out and total + record.size > max_bytes):
                break
            out.append(record)
            total += record.size
        return out

    def delete(self, ids: Iterable[int], sizes: Sequence[int] | None = None) -> None:
        if self.fail is not None:
            raise self.fail
        for row_id in ids:
            self.deleted.append(row_id)
            self.rows.pop(row_id, None)

    def replace(self, delete: Iterable[int], add: Sequence[SpoolRow]) -> list[int]:
        if self.fail is not None:
            raise self.fail
        delete = list(delete)
        self.replaced.append((delete, list(add)))
        for row_id in delete:
            self.rows.pop(row_id, None)
        return self._add(add)


class FakeInner:
    def __init__(self, on_settled: Callable[[list[tuple[int, Settlement]]], None],
                 on_retried: Callable[[str], None]) -> None:
        self.settle, self.retried = on_settled, on_retried
        self.put_calls: list[list[tuple[Record, int]]] = []
        self.healthy = self.alive = True
        self.last_error = None
        self.pending_records = 0

    def put(self, entries: Sequence[tuple[Record, int]]) -> None:
        self.put_calls.append(list(entries))

    @property
    def ids(self) -> list[int]:
        return [row_id for call in self.put_calls for _, row_id in call]

    def start(self) -> None: ...
    def drain(self, deadline_s: float) -> bool: return True
    def close(self, timeout_s: float = 1.0) -> None: ...
    def check_streams(self, streams: Iterable[str]) -> None: ...
    def set_aggregate_routes(self, routes: Iterable[str]) -> None: ...
    def stream_problems(self) -> dict[str, str]: return {}


class Metrics:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.commits: list[float] = []

    def spool_commit(self, seconds: float) -> None:
        self.commits.append(seconds)

    def spool_dropped(self, route: str, reason: str, n: int) -> None:
        self.counts[("spool_dropped", route, reason)] += n

    def records_dead_lettered(self, route: str, n: int) -> None:
        self.counts[("dead_lettered", route)] += n

    def records_dropped(self, route: str, reason: str, n: int) -> None:
        self.counts[("dropped", route, reason)] += n

    def callback_error(self) -> None:
        self.counts[("callback_error",)] += 1


class Token:
    def __init__(self, n: int, dead_letter: str | None = None, is_dead_letter: bool = False) -> None:
        self.message = Message(f"t/{n}", f'{{"n": {n}}}'.encode(), 1, 5000 + n)
        self.dead_letter, self.is_dead_letter, self.n = dead_letter, is_dead_letter, n


def entry(n: int, stream: str = "s1", dead_letter: str | None = None, size: int = 10) -> tuple[Record, Token]:
    data = b"d" * size
    return Record("r1", stream, f"k{n}", data, None, len(data) + 2), Token(n, dead_letter)


class Rig:
    def __init__(self, store: FakeStore | None = None, *, shards: int | None = 1, max_records: int = 4000,
                 publish: Any = None) -> None:
        self.clock = Clock()
        self.store = store or FakeStore()
        self.settled: list[tuple[Any, Settlement]] = []
        self.wakes = 0
        self.metrics = Metrics()
        self.published: list[tuple[str, bytes, Callable[[bool, str], None]]] = []
        self.inner: FakeInner | None = None

        def make_inner(settled: Any, retried: Any) -> FakeInner:
            self.inner = FakeInner(settled, retried)
            return self.inner

        def wake() -> None:
            self.wakes += 1

        def publish_(topic: str, payload: bytes, qos: int, done: Callable[[bool, str], None]) -> None:
            self.published.append((topic, payload, done))

        self.pacer = Pacer(self.clock, headroom=1.0, decrease=0.5)   # round figures for the pacing test
        self.sink = SpooledSink(self.store, make_inner, self.settled.extend, self.metrics, wake=wake,
                                publish=publish_ if publish is None else publish, clock=self.clock, pacer=self.pacer,
                                max_in_flight_records=max_records)
        if shards:
            self.pacer.set_shards("s1", shards)
        assert self.inner is not None
        self.kinesis: FakeInner = self.inner

    def settle(self, *results: tuple[int, Settlement]) -> None:
        self.kinesis.settle(list(results))


# -- the committer --------------------------------------------------------------------------------

def test_put_only_queues_and_one_commit_takes_everything_pending() -> None:
    rig = Rig()
    rig.sink.put([entry(1), entry(2)])
    rig.sink.put([entry(3)])
    assert rig.store.appends == [] and rig.settled == []
    assert rig.sink.pending_records == 3
    rig.sink.commit_once()
    assert rig.store.appends == [3], "one transaction for everything pending"
    assert [(t.n, s) for t, s in rig.settled] == [(1, PUT), (2, PUT), (3, PUT)]
    assert len(rig.metrics.commits) == 1 and rig.sink.pending_records == 0


def test_send_now_commits_on_the_calling_thread_so_the_acks_leave_without_a_hand_off() -> None:
    rig = Rig()
    rig.sink.put([entry(1)])
    rig.sink.send_now()      # the broker waits for our PUBACK (a window of one): no committer round trip
    assert rig.store.appends == [1] and [(t.n, s) for t, s in rig.settled] == [(1, PUT)]
    assert rig.sink.pending_records == 0


def test_a_put_to_be_sent_now_is_committed_by_the_caller_in_the_same_step() -> None:
    rig = Rig()
    rig.sink.put([entry(1), entry(2)], now=True)   # the broker's window is full: no committer wake-up
    assert rig.store.appends == [2] and [t.n for t, _ in rig.settled] == [1, 2]


def test_send_now_leaves_the_batch_to_a_commit_in_progress_and_never_commits_out_of_order() -> None:
    rig = Rig()
    rig.sink.put([entry(1)])
    taken: list[int] = []
    real_append = rig.store.append

    def append_and_meanwhile_send_now(rows: Any, sizes: Any = None) -> list[int]:
        taken.append(len(rows))
        if len(taken) == 1:
            rig.sink.put([entry(2)])
            rig.sink.send_now()      # the committer is busy: entry 2 waits for the next commit
        return real_append(rows, sizes)

    rig.store.append = append_and_meanwhile_send_now  # type: ignore[method-assign]
    rig.sink.commit_once()
    assert taken == [1] and [t.n for t, _ in rig.settled] == [1] and rig.sink.pending_records == 1
    rig.sink.commit_once()
    assert taken == [1, 1] and [t.n for t, _ in rig.settled] == [1, 2]


def test_send_now_does_not_commit_into_a_spool_that_is_not_accepting() -> None:
    rig = Rig()
    rig.store.fail = SpoolUnavailable("disk_full", "spool x: disk full (ENOSPC)")
    rig.sink.put([entry(1)])
    rig.sink.commit_once()
    rig.store.fail = None    # writable again, but the committer's retry decides when: not send_now
    rig.sink.send_now()
    assert rig.settled == [] and rig.sink.pending_records == 1


def test_rows_keep_what_delivery_and_the_dead_letter_need() -> None:
    rig = Rig()
    record, token = entry(7, dead_letter="kinesis:dlq")
    rig.sink.put([(record, token)])
    rig.sink.commit_once()
    row = rig.store.rows[1].row
    assert row == SpoolRow("r1", "s1", "k7", None, 5007, record.data, "t/7", "kinesis:dlq", False)


def test_block_a_full_spool_stops_accepting_and_resumes_once_the_sender_freed_room() -> None:
    rig = Rig(FakeStore(capacity=3 * row_size(SpoolRow("r1", "s1", "k1", None, 0, b"d" * 10, "t/1", None, False))))
    rig.sink.put([entry(1), entry(2), entry(3)])
    rig.sink.commit_once()
    rig.sink.put([entry(4)])
    rig.sink.commit_once()
    assert not rig.sink.accepting and len(rig.settled) == 3
    assert rig.sink.pending_records == 1, "the refused record waits, unacknowledged"
    rig.sink.sender.step()                       # reads the three rows, hands them over
    rig.settle((1, PUT))
    rig.sink.sender.step()                       # deletes row 1: room
    rig.sink.commit_once()
    assert rig.sink.accepting and rig.wakes == 1
    assert [t.n for t, _ in rig.settled] == [1, 2, 3, 4]


def test_block_fills_the_spool_up_to_the_record_that_does_not_fit() -> None:
    one = row_size(SpoolRow("r1", "s1", "k1", None, 0, b"d" * 10, "t/1", None, False))
    rig = Rig(FakeStore(capacity=8 * one))   # a chunk is a quarter of the spool: two records
    rig.sink.put([entry(n) for n in range(1, 6)])
    rig.sink.commit_once()
    rig.sink.put([entry(n) for n in range(6, 10)])
    rig.sink.commit_once()
    assert rig.store.records == 8, "the chunk that overflows still leaves its first records in the spool"
    assert [t.n for t, _ in rig.settled] == list(range(1, 9)) and rig.sink.pending_records == 1
    assert not rig.sink.accepting


def test_an_unwritable_spool_is_told_once_blocks_and_recovers_by_itself(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    rig.store.fail = SpoolUnavailable("disk_full", "spool x: disk full (ENOSPC)")
    caplog.set_level(logging.INFO, "gateway.spool")
    rig.sink.put([entry(1)])
    for _ in range(5):
        rig.sink.commit_once()
    assert rig.sink.spool_problem == "spool x: disk full (ENOSPC)" and not rig.sink.healthy
    assert not rig.sink.accepting and rig.settled == []
    assert len([r for r in caplog.records if "cannot be written" in r.getMessage()]) == 1
    rig.store.fail = None
    rig.sink.commit_once()
    assert rig.sink.spool_problem is None and rig.sink.accepting and rig.wakes == 1
    assert [t.n for t, _ in rig.settled] == [1]
    assert any("can be written again" in r.getMessage() for r in caplog.records)


def test_a_spool_that_could_not_be_opened_starts_blocked_and_probes_without_messages() -> None:
    clock = Clock()
    store = FakeStore()
    store.fail = SpoolUnavailable("read_only", "spool x: read-only file system")
    sink = SpooledSink(store, lambda s, r: FakeInner(s, r), lambda _: None, Metrics(), clock=clock,
                       initial_problem="spool x: read-only file system")
    assert not sink.accepting and sink.spool_problem is not None
    store.fail = None
    sink.commit_once()   # nothing pending: an empty append tells whether the spool is writable
    assert sink.accepting and sink.spool_problem is None


def test_a_record_larger_than_the_whole_spool_goes_to_its_dead_letter_instead_of_blocking_for_ever() -> None:
    rig = Rig(FakeStore(capacity=100))
    rig.sink.put([entry(1, size=500)])
    rig.sink.commit_once()
    (token, settlement), = rig.settled
    assert isinstance(settlement, Failed) and settlement.code == "too_large" and rig.sink.accepting


def test_drop_oldest_counts_per_route_but_not_the_rows_still_being_delivered() -> None:
    size = row_size(SpoolRow("r1", "s1", "k1", None, 0, b"d" * 10, "t/1", None, False))
    rig = Rig(FakeStore(capacity=4 * size, when_full="drop_oldest"), max_records=2)
    rig.sink.put([entry(n) for n in range(1, 5)])
    rig.sink.commit_once()
    rig.sink.sender.step()                 # rows 1 and 2 are in flight (at Kinesis)
    assert rig.kinesis.ids == [1, 2]
    rig.sink.put([entry(n) for n in range(5, 8)])
    rig.sink.commit_once()                 # drops rows 1, 2, 3: only 3 was not being delivered
    assert rig.metrics.counts[("spool_dropped", "r1", "when_full")] == 1
    rig.settle((1, PUT), (2, PUT))
    rig.sink.sender.step()
    assert sorted(rig.store.rows) == [4, 5, 6, 7] and rig.kinesis.ids == [1, 2, 4, 5]


# -- the sender -----------------------------------------------------------------------------------

def test_rows_already_spooled_go_first_in_id_order_and_leave_only_when_kinesis_has_them() -> None:
    store = FakeStore()
    store._add([SpoolRow("old", "s1", f"k{n}", None, n, b"x", "t", None, False) for n in range(3)])
    rig = Rig(store)
    rig.sink.put([entry(9)])
    rig.sink.commit_once()
    rig.sink.sender.step()
    assert rig.kinesis.ids == [1, 2, 3, 4]
    assert [r.route for r, _ in rig.kinesis.put_calls[0]] == ["old", "old", "old", "r1"]
    rig.settle((2, PUT), (1, PUT))
    assert store.deleted == []
    rig.sink.sender.step()
    assert sorted(store.deleted) == [1, 2] and sorted(store.rows) == [3, 4]


def test_records_in_memory_are_bounded_and_the_rest_is_read_as_room_returns() -> None:
    rig = Rig(max_records=2)
    rig.sink.put([entry(n) for n in range(1, 6)])
    rig.sink.commit_once()
    rig.sink.sender.step()
    assert rig.kinesis.ids == [1, 2] and rig.sink.sender.in_flight == 2
    rig.settle((1, PUT))
    rig.sink.sender.step()
    assert rig.kinesis.ids == [1, 2, 3]


class CountingStore(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read(self, after_id: int, max_records: int, max_bytes: int) -> list[SpooledRecord]:
        self.reads += 1
        return super().read(after_id, max_records, max_bytes)


def test_rows_just_committed_are_handed_over_from_memory_not_read_back() -> None:
    store = CountingStore()
    rig = Rig(store)
    rig.sink.sender.step()                      # the start-up read finds the spool empty
    reads = store.reads
    for n in range(1, 4):
        rig.sink.put([entry(n)])
        rig.sink.commit_once()
        rig.sink.sender.step()
    assert store.reads == reads and rig.kinesis.ids == [1, 2, 3]
    assert [r.partition_key for r, _ in rig.kinesis.put_calls[-1]] == ["k3"]


def test_rows_committed_while_others_are_in_flight_wake_the_sender_once_per_interval_not_per_commit() -> None:
    """A window of one commits every message alone: a hand-over (and a wake of the sender) for each
    would cost more than the message. Nothing in flight: at once."""
    rig = Rig()
    sender = rig.sink.sender
    sender.step()
    rig.sink.put([entry(1)])
    rig.sink.commit_once()
    assert sender._has_work(rig.clock.now)          # nothing was in flight: handed over at once
    sender.step()
    for n in (2, 3):
        rig.sink.put([entry(n)])
        rig.sink.commit_once()
        assert not sender._has_work(rig.clock.now)  # row 1 is in flight: these wait for the interval
    rig.clock.now += 0.01
    assert sender._has_work(rig.clock.now)
    sender.step()
    assert rig.kinesis.ids == [1, 2, 3] and len(rig.kinesis.put_calls) == 2


def test_rows_committed_while_others_wait_unread_are_read_in_id_order_not_jumped_ahead() -> None:
    store = CountingStore()
    rig = Rig(store, max_records=2)
    rig.sink.sender.step()
    rig.sink.put([entry(n) for n in range(1, 4)])   # 3 rows, room for 2: the commit is read from the spool
    rig.sink.commit_once()
    rig.sink.sender.step()
    assert rig.kinesis.ids == [1, 2]
    rig.sink.put([entry(4)])                        # row 3 is still unread: row 4 must not pass it
    rig.sink.commit_once()
    rig.settle((1, PUT), (2, PUT))
    rig.sink.sender.step()
    rig.settle((3, PUT), (4, PUT))
    rig.sink.sender.step()
    assert rig.kinesis.ids == [1, 2, 3, 4]


def test_a_commit_while_the_sender_reads_is_handed_over_once_not_twice() -> None:
    store = CountingStore()
    rig = Rig(store)
    real_read = store.read

    def read_while_the_committer_commits(after_id: int, max_records: int, max_bytes: int) -> list[SpooledRecord]:
        if store.reads == 0:                     # the first read: the committer commits id 1 meanwhile,
            rig.sink.put([entry(1)])             # so the read returns it as well
            rig.sink.commit_once()
        return real_read(after_id, max_records, max_bytes)

    store.read = read_while_the_committer_commits  # type: ignore[method-assign]
    rig.sink.sender.step()
    rig.sink.sender.step()
    assert rig.kinesis.ids == [1] and rig.sink.sender.in_flight == 1


def test_a_commit_right_after_a_dead_letter_envelope_was_written_does_not_skip_the_envelope() -> None:
    store = CountingStore()
    rig = Rig(store)
    rig.sink.sender.step()                       # the spool is read to its end: commits come from memory
    rig.sink.put([entry(1, dead_letter="kinesis:dlq")])
    rig.sink.commit_once()
    rig.sink.sender.step()
    assert store.reads == 1
    real_replace = store.replace

    def replace_while_the_committer_commits(delete: Any, add: Any) -> list[int]:
        ids = real_replace(delete, add)          # the envelope takes id 2 ...
        rig.sink.put([entry(3)])                 # ... and the committer commits id 3 before the sender
        rig.sink.commit_once()                   # has noted that the envelope is unread
        return ids

    store.replace = replace_while_the_committer_commits  # type: ignore[method-assign]
    rig.settle((1, Failed("refused", True, "other")))
    rig.sink.sender.step()
    rig.sink.sender.step()
    assert rig.kinesis.ids == [1, 2, 3]
    assert [r.stream for call in rig.kinesis.put_calls for r, _ in call] == ["s1", "dlq", "s1"]


def test_a_kinesis_dead_letter_replaces_the_row_with_its_envelope_in_one_transaction() -> None:
    rig = Rig()
    rig.sink.put([entry(1, dead_letter="kinesis:dlq")])
    rig.sink.commit_once()
    rig.sink.sender.step()
    rig.settle((1, Failed("too big for the stream", True, "too_large")))
    rig.sink.sender.step()
    (deleted, (envelope,)), = rig.store.replaced
    assert deleted == [1]
    assert envelope.stream == "dlq" and envelope.is_dead_letter and envelope.partition_key == "t/1"
    assert envelope.data == dead_letter_envelope("t/1", b"d" * 10, 5001, "r1", "too big for the stream")
    assert json.loads(envelope.data)["reason"] == "too big for the stream"
    assert rig.metrics.counts[("dead_lettered", "r1")] == 1
    assert rig.kinesis.ids == [1, 2], "the envelope is delivered from the spool like any row"


def test_an_mqtt_dead_letter_is_deleted_once_published_and_a_failed_one_is_a_counted_drop() -> None:
    rig = Rig()
    rig.sink.put([entry(1, dead_letter="mqtt:dead/letters"), entry(2, dead_letter="mqtt:dead/letters")])
    rig.sink.commit_once()
    rig.sink.sender.step()
    rig.settle((1, Failed("refused", True, "rejected_by_kinesis")), (2, Failed("refused", True, "rejected_by_kinesis")))
    rig.sink.sender.step()
    assert [topic for topic, _, _ in rig.published] == ["dead/letters", "dead/letters"]
    assert rig.store.deleted == []
    rig.published[0][2](True, "")
    rig.published[1][2](False, "not connected")
    rig.sink.sender.step()
    assert sorted(rig.store.deleted) == [1, 2]
    assert rig.metrics.counts[("dead_lettered", "r1")] == 1
    assert rig.metrics.counts[("spool_dropped", "r1", "dead_letter_failed")] == 1


def test_a_failed_record_without_dead_letter_is_counted_logged_and_deleted(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    rig.sink.put([entry(1)])
    rig.sink.commit_once()
    rig.sink.sender.step()
    rig.settle((1, Failed("rejected by Kinesis (ValidationException)", True, "rejected_by_kinesis")))
    rig.sink.sender.step()
    assert rig.store.deleted == [1]
    assert rig.metrics.counts[("spool_dropped", "r1", "no_dead_letter")] == 1
    assert rig.metrics.counts[("dropped", "r1", "rejected_by_kinesis")] == 1
    assert any("no dead letter configured" in r.getMessage() for r in caplog.records)


def test_deletes_that_fail_are_kept_and_tried_again() -> None:
    rig = Rig()
    rig.sink.put([entry(1)])
    rig.sink.commit_once()
    rig.sink.sender.step()
    rig.settle((1, PUT))
    rig.store.fail = SpoolUnavailable("io_error", "spool x: I/O error")
    rig.sink.sender.step()
    assert rig.sink.spool_problem == "spool x: I/O error" and 1 in rig.store.rows
    rig.store.fail = None
    rig.sink.sender.step()
    assert rig.store.deleted == [1] and rig.sink.spool_problem is None


def test_the_sender_paces_a_stream_to_its_shards() -> None:
    rig = Rig(shards=1)
    rig.sink.put([entry(n) for n in range(1, 1001)])
    rig.sink.commit_once()
    rig.sink.sender.step()
    first = len(rig.kinesis.ids)
    assert first == 200, "a full bucket: 0.2 s of one shard's 1,000 records/s"
    rig.clock.now += 0.1
    rig.sink.sender.step()
    assert len(rig.kinesis.ids) == first + 100
    rig.kinesis.retried("s1")          # throttled: half the rate for a while
    rig.clock.now += 0.1
    rig.sink.sender.step()
    assert len(rig.kinesis.ids) == first + 100 + 50


def test_drop_oldest_does_not_count_a_row_delivered_but_not_yet_deleted() -> None:
    size = row_size(SpoolRow("r1", "s1", "k1", None, 0, b"d" * 10, "t/1", None, False))
    rig = Rig(FakeStore(capacity=2 * size, when_full="drop_oldest"))
    rig.sink.put([entry(1), entry(2)])
    rig.sink.commit_once()
    rig.sink.sender.step()
    rig.settle((1, PUT))                   # Kinesis has row 1; the sender has not deleted it yet
    rig.sink.put([entry(3)])
    rig.sink.commit_once()                 # the store drops row 1 to make room
    assert rig.metrics.counts[("spool_dropped", "r1", "when_full")] == 0
    rig.settle((2, PUT))
    rig.sink.put([entry(4)])
    rig.sink.commit_once()                 # drops row 2, in flight and then delivered: not counted either
    assert rig.metrics.counts[("spool_dropped", "r1", "when_full")] == 0
