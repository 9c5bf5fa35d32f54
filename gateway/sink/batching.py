"""Per-stream queues and PutRecords batch cutting, with the request limits checked up front.

Invariant owned here: every Entry that reaches a batch already satisfies the per-record limits
(key 1-256 characters, data + UTF-8 key bytes <= the record limit, explicit hash key a decimal
in 0..2**128-1), and every batch cut satisfies the per-request limits. A record that fails a
per-record check is rejected before it can join a batch, so one bad record never poisons the
others (reliability.md §0.9: Kinesis rejects the whole request).

Nothing here takes a lock or does I/O; the sink calls it under its own lock.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gateway.model import MAX_PARTITION_KEY_CHARS, PUT, Failed, Settlement, is_hash_key

__all__ = ["Entry", "Outcome", "StreamState", "check_record", "find_job"]


_seq = itertools.count()


class Entry:
    """One Kinesis record on its way: a user record, or a KPL aggregate of several.

    `members` is None for a plain record (then `route`/`token` describe it) or a list of
    (route, token) pairs for an aggregate, whose settlement is the settlement of every member.
    """

    __slots__ = (
        "pk",
        "data",
        "ehk",
        "size",
        "route",
        "token",
        "members",
        "attempts",
        "born",
        "enq",
        "shard",
    )

    def __init__(
        self,
        pk: str,
        data: bytes,
        ehk: str | None,
        size: int,
        route: str,
        token: Any,
        born: float,
        members: list[tuple[str, Any]] | None = None,
        shard: str | None = None,
    ) -> None:
        self.pk = pk
        self.data = data
        self.ehk = ehk
        self.size = size
        self.route = route
        self.token = token
        self.members = members
        self.attempts = 0
        self.born = born
        self.enq = born
        self.shard = shard

    @property
    def count(self) -> int:
        """User records carried: what backpressure and metrics count."""
        return 1 if self.members is None else len(self.members)

    def request_entry(self) -> dict[str, Any]:
        """The PutRecords entry; data bytes are passed through untouched."""
        if self.ehk is None:
            return {"Data": self.data, "PartitionKey": self.pk}
        return {"Data": self.data, "PartitionKey": self.pk, "ExplicitHashKey": self.ehk}


_INVALID_KEY = Failed("invalid partition key", permanent=True, code="key_type")
_NOT_BYTES = Failed("record data is not bytes", permanent=True, code="other")
_TOO_LARGE = Failed("record too large", permanent=True, code="too_large")
_INVALID_HASH_KEY = Failed("invalid explicit hash key", permanent=True, code="hash_key")


def check_record(pk: Any, data: Any, ehk: Any, max_record_bytes: int) -> tuple[int, Failed | None]:
    """Return (size, None) for a sendable record, or (0, why) for one that never can be."""
    if not isinstance(pk, str) or not 0 < len(pk) <= MAX_PARTITION_KEY_CHARS:
        return 0, _INVALID_KEY
    if not isinstance(data, (bytes, bytearray)):
        return 0, _NOT_BYTES
    if pk.isascii():
        size = len(data) + len(pk)
    else:
        try:
            size = len(data) + len(pk.encode("utf-8"))
        except UnicodeEncodeError:
            return 0, _INVALID_KEY
    if size > max_record_bytes:
        return 0, _TOO_LARGE
    if ehk is not None and not is_hash_key(ehk):
        return 0, _INVALID_HASH_KEY
    return size, None


class StreamState:
    """Everything queued for one stream: new records, delayed retries, bisection halves.

    `pending` holds entries ready to batch in send order (retries are put back at the front so
    they overtake newer records); `delayed` is a heap of entries waiting out their backoff;
    `splits` holds halves of a rejected batch, each sent alone until the bad entry is found.
    `agg` holds user records of aggregating routes until they are packed into KPL aggregates.
    """

    __slots__ = (
        "name",
        "pending",
        "pending_bytes",
        "delayed",
        "splits",
        "agg",
        "agg_bytes",
        "paused_until",
        "failures",
        "held",
        "shard_map",
        "map_stale",
        "map_loading",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: deque[Entry] = deque()
        self.pending_bytes = 0
        self.delayed: list[tuple[float, int, Entry]] = []
        self.splits: deque[list[Entry]] = deque()
        self.agg: list[Entry] = []
        self.agg_bytes = 0
        self.paused_until = 0.0
        self.failures = 0
        self.held: str | None = None
        self.shard_map: Any = None
        self.map_stale = True
        self.map_loading = False


    def append(self, entry: Entry) -> None:
        self.pending.append(entry)
        self.pending_bytes += entry.size

    def requeue_front(self, entries: list[Entry], ready_at: float) -> None:
        """Put entries back ahead of newer ones, in their original order, ready at once."""
        for entry in reversed(entries):
            entry.enq = ready_at
            self.pending.appendleft(entry)
            self.pending_bytes += entry.size

    def delay(self, entry: Entry, until: float) -> None:
        heapq.heappush(self.delayed, (until, next(_seq), entry))

    def release_due(self, now: float, ready_at: float) -> float | None:
        """Move retries whose backoff has passed to the front; return the next due time."""
        due: list[Entry] = []
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            due.append(heapq.heappop(delayed)[2])
        if due:
            self.requeue_front(due, ready_at)
        return delayed[0][0] if delayed else None

    def is_full(self, max_records: int, max_bytes: int) -> bool:
        return len(self.pending) >= max_records or self.pending_bytes >= max_bytes

    def cut(self, max_records: int, max_bytes: int) -> list[Entry]:
        """Take the longest prefix of `pending` that fits one request.

        The first entry always fits (each entry is <= the record limit <= the request limit),
        so a cut always makes progress.
        """
        pending = self.pending
        batch: list[Entry] = []
        total = 0
        while pending and len(batch) < max_records:
            size = pending[0].size
            if batch and total + size > max_bytes:
                break
            batch.append(pending.popleft())
            total += size
        self.pending_bytes -= total
        return batch

    def take_agg(self) -> list[Entry]:
        taken, self.agg, self.agg_bytes = self.agg, [], 0
        return taken

    def is_empty(self) -> bool:
        return not (self.pending or self.delayed or self.splits or self.agg)


class Outcome:
    """Settlements and metric counts gathered under the sink's lock, delivered after it."""

    __slots__ = ("settled", "put", "failed", "retried", "count")

    def __init__(self) -> None:
        self.settled: list[tuple[Any, Settlement]] = []
        self.put: dict[str, int] = {}
        self.failed: dict[tuple[str, str], int] = {}
        self.retried = 0
        self.count = 0

    def add(self, entry: Entry, settlement: Settlement) -> None:
        """Settle an entry: a plain record's token, or every member token of an aggregate."""
        if entry.members is None:
            self.settled.append((entry.token, settlement))
            routes: Iterable[str] = (entry.route,)
        else:
            self.settled.extend((token, settlement) for _, token in entry.members)
            routes = [route for route, _ in entry.members]
        if isinstance(settlement, Failed):
            failed, reason = self.failed, settlement.code
            for route in routes:
                failed[(route, reason)] = failed.get((route, reason), 0) + 1
                self.count += 1
        else:
            put = self.put
            for route in routes:
                put[route] = put.get(route, 0) + 1
                self.count += 1


def find_job(
    order: list[StreamState],
    start: int,
    now: float,
    linger: float,
    max_records: int,
    max_bytes: int,
    force: bool,
) -> tuple[tuple | None, int, float | None]:
    """Choose the next due piece of work, round-robin from `start`.

    Returns (job, next start, wake time). Jobs: ("send", stream, batch), ("map", stream) to
    load a shard map, ("aggregate", stream, user records). With no job due, the wake time is
    when one will be (None: nothing queued). A paused stream is skipped until its pause ends.
    """
    wake: float | None = None
    count = len(order)
    for i in range(count):
        index = (start + i) % count
        s = order[index]
        if s.paused_until > now:
            wake = _earliest(wake, s.paused_until)
            continue
        if s.delayed:
            wake = _earliest(wake, s.release_due(now, now - linger))
        if s.splits:
            return ("send", s, s.splits.popleft()), index + 1, None
        if s.agg and not s.map_loading:
            if force or s.agg_bytes >= max_bytes or now - s.agg[0].enq >= linger:
                if s.map_stale:
                    s.map_loading = True
                    return ("map", s), index + 1, None
                return ("aggregate", s, s.take_agg()), index + 1, None
            wake = _earliest(wake, s.agg[0].enq + linger)
        if s.pending:
            if force or s.is_full(max_records, max_bytes) or now - s.pending[0].enq >= linger:
                return ("send", s, s.cut(max_records, max_bytes)), index + 1, None
            wake = _earliest(wake, s.pending[0].enq + linger)
    return None, start, wake


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a < b else b
