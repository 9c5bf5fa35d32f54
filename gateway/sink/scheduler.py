"""What the sink's workers do next: which batch goes out, and when.

Why a module of its own: the decision (linger, full batches, paused streams, retries waiting out
their backoff, a drain or a full backlog that skips the linger, stream checks and their re-checks)
is the part of the sink with the most cases, and it is pure: no lock, no I/O, no clock of its
own. The sink calls it under its lock with the current time; tests call it with any time.

Invariants owned here:
- a queued entry is handed out in exactly one job; a record over the stream's size limit is
  refused before it is queued and comes back in a ``Refuse`` job, so it never joins a batch;
- streams take turns (round robin), and a paused stream is skipped until its pause ends;
- every stream given to ``check`` is checked once at once, then again while its check fails,
  after 10 s doubling up to 60 s; one check runs at a time, so checks never take every worker;
- with no job due, ``next_job`` returns when one will be (None: nothing is queued).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from gateway.model import Failed, Record, record_size
from gateway.sink.batching import Entry, StreamState

if TYPE_CHECKING:
    from gateway.sink.shards import ShardMap

__all__ = [
    "CHECK_AGAIN_CAP_S", "CHECK_AGAIN_S", "TOO_LARGE", "Aggregate", "CheckStream", "Job", "LoadShardMap", "Refuse",
    "Refused", "Scheduler", "Send",
]

T = TypeVar("T")

TOO_LARGE = Failed("record too large", permanent=True, code="too_large")
CHECK_AGAIN_S = 10.0       # a failed stream check is repeated after this long, doubling...
CHECK_AGAIN_CAP_S = 60.0   # ...up to this, so a stream created later turns ready within a minute

Refused = tuple[Entry[T], Failed, str]
"""A record the sink can never send: its entry, why, and the stream it was meant for."""


@dataclass(frozen=True, slots=True, eq=False)
class Send(Generic[T]):
    """Send one PutRecords request of ``batch`` to ``stream``."""

    stream: StreamState[T]
    batch: list[Entry[T]]


@dataclass(frozen=True, slots=True, eq=False)
class LoadShardMap(Generic[T]):
    """Read the stream's open shards (ListShards) before its records are aggregated."""

    stream: StreamState[T]


@dataclass(frozen=True, slots=True, eq=False)
class Aggregate(Generic[T]):
    """Pack ``records`` of aggregating routes into KPL aggregates, then queue them to send."""

    stream: StreamState[T]
    records: list[Entry[T]]


@dataclass(frozen=True, slots=True, eq=False)
class Refuse(Generic[T]):
    """Settle records that can never be sent as Failed."""

    refused: list[Refused[T]]


@dataclass(frozen=True, slots=True)
class CheckStream:
    """Ask Kinesis whether ``stream`` exists and takes writes (DescribeStreamSummary)."""

    stream: str


Job = Send[T] | LoadShardMap[T] | Aggregate[T] | Refuse[T] | CheckStream


class _Check:
    """When a stream is to be checked next (None: its check is running)."""

    __slots__ = ("due", "failures")

    def __init__(self, due: float | None) -> None:
        self.due = due
        self.failures = 0


class Scheduler(Generic[T]):
    """The queues of every stream and the choice of the next job."""

    def __init__(self, *, linger_s: float, max_records: int, max_bytes: int, max_record_bytes: int,
                 aggregate_routes: Iterable[str] = ()) -> None:
        self.linger_s = linger_s
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._max_record_bytes = max_record_bytes
        self._aggregate_routes = frozenset(aggregate_routes)
        self._streams: dict[str, StreamState[T]] = {}
        self._order: list[StreamState[T]] = []
        self._next = 0                 # round robin: the stream looked at first
        self._refused: list[Refused[T]] = []
        self._drains = 0               # drains in progress: the linger is skipped meanwhile
        self._urgent: set[str] = set()  # streams whose queued records send_now() asked to go at once
        self._sending = 0              # Send jobs handed out and not yet done
        self._checks: dict[str, _Check] = {}  # streams not yet known to work
        self._checking: str | None = None  # the stream whose check is running

    # ---- input ----------------------------------------------------------------------------

    def set_aggregate_routes(self, routes: Iterable[str]) -> None:
        self._aggregate_routes = frozenset(routes)

    def accept(self, pairs: Sequence[tuple[Record, T]], now: float) -> bool:
        """Queue records; True when a worker should wake (a batch filled up or a queue began).

        Only the size is checked, against the stream's limit: the router built the record and
        vouches for its key and hash key. ``Record.size`` 0 means it was not computed (tools,
        tests), and is computed here.
        """
        max_record, max_records, max_bytes = self._max_record_bytes, self._max_records, self._max_bytes
        aggregate_routes = self._aggregate_routes
        streams = self._streams
        wake = False
        for record, token in pairs:
            pk, data = record.partition_key, record.data
            size = record.size or record_size(pk, data)
            entry = Entry(pk, data, record.explicit_hash_key, size, record.route, token, now)
            if size > max_record:
                self._refused.append((entry, TOO_LARGE, record.stream))
                wake = True
                continue
            s = streams.get(record.stream)
            if s is None:
                s = self._add_stream(record.stream)
            if aggregate_routes and record.route in aggregate_routes:
                wake = wake or not s.agg
                s.agg.append(entry)
                s.agg_bytes += size
                wake = wake or s.agg_bytes >= max_bytes
            else:
                wake = wake or not s.pending
                s.pending.append(entry)
                s.pending_bytes += size
                wake = wake or len(s.pending) >= max_records or s.pending_bytes >= max_bytes
        return wake

    def send_now(self) -> None:
        """Skip the linger once for what is queued now, when no request is in flight (see
        KinesisSink.send_now). Records that arrive later wait out the linger as usual: were the
        urgency to last while records keep coming, a steady trickle would never linger again."""
        self._urgent = {s.name for s in self._order if s.has_work()}

    def begin_drain(self) -> None:
        self._drains += 1

    def end_drain(self) -> None:
        self._drains -= 1

    def requeue(self, s: StreamState[T], entries: list[Entry[T]], now: float) -> None:
        """Queue aggregated (or unaggregated) records to go out at once, ahead of newer ones."""
        s.requeue_front(entries, now - self.linger_s)

    def shard_map_loaded(self, s: StreamState[T], shard_map: ShardMap | None) -> None:
        s.shard_map, s.map_stale, s.map_loading = shard_map, False, False

    def done(self, job: Job[T]) -> None:
        """A job handed out by ``next_job`` has run (whatever its result)."""
        if isinstance(job, Send):
            self._sending -= 1
        elif isinstance(job, CheckStream) and self._checking == job.stream:
            self._checking = None

    def check(self, streams: Iterable[str], now: float) -> None:
        """Check these streams (and no others) now: at start-up, and after each reload."""
        self._checks = {stream: _Check(now) for stream in streams}

    def checked(self, stream: str, ok: bool, now: float) -> None:
        """A stream's check answered: done when ``ok``, else again after a growing delay."""
        state = self._checks.get(stream)
        if state is None:
            return
        if ok:
            del self._checks[stream]
            return
        state.failures += 1
        state.due = now + min(CHECK_AGAIN_CAP_S, CHECK_AGAIN_S * 2 ** min(state.failures - 1, 16))

    def stop_checking(self, stream: str) -> None:
        """A request to ``stream`` succeeded: that answers the question a check would ask."""
        self._checks.pop(stream, None)

    def resume(self, stream: str, now: float) -> None:
        """A stream that failed works again: end its pause, so held records go at once."""
        s = self._streams.get(stream)
        if s is not None and s.paused_until > now:
            s.paused_until = now

    # ---- the decision ---------------------------------------------------------------------

    def has_work(self) -> bool:
        """Something is queued that a worker must eventually wake for."""
        return (bool(self._refused) or any(s.has_work() for s in self._order)
                or (self._checking is None and self._next_check() is not None))

    def next_job(self, now: float) -> tuple[Job[T] | None, float | None]:
        """The next job due at ``now``, or None and when one will be due (None: nothing queued)."""
        if self._refused:
            refused, self._refused = self._refused, []
            return Refuse(refused), None
        check_at: float | None = None
        if self._checking is None and self._checks:
            check = self._next_check()
            if check is not None:
                stream, check_at = check
                if check_at <= now:
                    self._checking = stream
                    self._checks[stream].due = None
                    return CheckStream(stream), None
        job, wake = self._find(now, self._drains > 0 or (bool(self._urgent) and self._sending == 0))
        if job is None:
            if self._sending == 0:
                self._urgent.clear()
            return None, _earliest(wake, check_at)
        if isinstance(job, Send):
            self._sending += 1
            self._urgent.discard(job.stream.name)
        return job, None

    def _next_check(self) -> tuple[str, float] | None:
        """The stream to check first and when, or None when no check is scheduled."""
        best: tuple[str, float] | None = None
        for stream, state in self._checks.items():
            if state.due is not None and (best is None or state.due < best[1]):
                best = (stream, state.due)
        return best

    def _find(self, now: float, force: bool) -> tuple[Job[T] | None, float | None]:
        order, linger = self._order, self.linger_s
        max_records, max_bytes = self._max_records, self._max_bytes
        wake: float | None = None
        count = len(order)
        for i in range(count):
            index = (self._next + i) % count
            s = order[index]
            if s.paused_until > now:
                wake = _earliest(wake, s.paused_until)
                continue
            if s.delayed:
                wake = _earliest(wake, s.release_due(now, now - linger))
            job: Job[T] | None = None
            if s.splits:
                job = Send(s, s.splits.popleft())
            elif s.agg and not s.map_loading and (
                    force or s.agg_bytes >= max_bytes or now - s.agg[0].enq >= linger):
                if s.map_stale:
                    s.map_loading = True
                    job = LoadShardMap(s)
                else:
                    job = Aggregate(s, s.take_agg())
            else:
                if s.agg and not s.map_loading:
                    wake = _earliest(wake, s.agg[0].enq + linger)
                if s.pending:
                    if force or s.is_full(max_records, max_bytes) or now - s.pending[0].enq >= linger:
                        job = Send(s, s.cut(max_records, max_bytes))
                    else:
                        wake = _earliest(wake, s.pending[0].enq + linger)
            if job is not None:
                self._next = index + 1
                return job, None
        return None, wake

    def _add_stream(self, name: str) -> StreamState[T]:
        s: StreamState[T] = StreamState(name)
        self._streams[name] = s
        self._order.append(s)
        return s


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a < b else b
