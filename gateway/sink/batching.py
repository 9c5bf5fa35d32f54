"""Per-stream queues, PutRecords batch cutting, and the settlements gathered from a response.

Invariant owned here: every batch cut satisfies the per-request limits (at most ``max_records``
entries and ``max_bytes`` counting keys), and a cut always takes at least one entry, so a queue
always drains. Per-record limits are not checked here: the router builds only records that
satisfy them (gateway/model.py), and the sink refuses a record over the stream's size limit
before it is queued, so one bad record never poisons a request (Kinesis refuses the whole
request; docs/delivery.md).

Nothing here takes a lock or does I/O; the sink calls it under its own lock.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from gateway.model import Failed, Settlement

if TYPE_CHECKING:
    from gateway.sink.shards import ShardMap

__all__ = ["Entry", "SettlementBatch", "StreamState"]

T = TypeVar("T")

_seq = itertools.count()


class Entry(Generic[T]):
    """One Kinesis record on its way: a user record, or a KPL aggregate of several.

    ``members`` is None for a user record (then ``route`` and ``token`` describe it) or the
    (route, token) pairs of an aggregate, whose settlement is the settlement of every member; an
    aggregate's own ``route`` and ``token`` are its first member's.
    """

    __slots__ = ("attempts", "born", "data", "ehk", "enq", "members", "pk", "route", "shard", "size", "token")

    def __init__(
        self,
        pk: str,
        data: bytes,
        ehk: str | None,
        size: int,
        route: str,
        token: T,
        born: float,
        members: list[tuple[str, T]] | None = None,
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


class StreamState(Generic[T]):
    """Everything queued for one stream: new records, delayed retries, bisection halves.

    ``pending`` holds entries ready to batch in send order (retries are put back at the front so
    they overtake newer records); ``delayed`` is a heap of entries waiting out their backoff;
    ``splits`` holds halves of a rejected batch, each sent alone until the bad entry is found;
    ``agg`` holds user records of aggregating routes until they are packed into KPL aggregates.
    """

    __slots__ = (
        "agg",
        "agg_bytes",
        "delayed",
        "failures",
        "map_loading",
        "map_stale",
        "name",
        "paused_until",
        "pending",
        "pending_bytes",
        "shard_map",
        "splits",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: deque[Entry[T]] = deque()
        self.pending_bytes = 0
        self.delayed: list[tuple[float, int, Entry[T]]] = []
        self.splits: deque[list[Entry[T]]] = deque()
        self.agg: list[Entry[T]] = []
        self.agg_bytes = 0
        self.paused_until = 0.0
        self.failures = 0
        self.shard_map: ShardMap | None = None
        self.map_stale = True
        self.map_loading = False

    def requeue_front(self, entries: list[Entry[T]], ready_at: float) -> None:
        """Put entries back ahead of newer ones, in their original order, ready at once."""
        for entry in reversed(entries):
            entry.enq = ready_at
            self.pending.appendleft(entry)
            self.pending_bytes += entry.size

    def delay(self, entry: Entry[T], until: float) -> None:
        heapq.heappush(self.delayed, (until, next(_seq), entry))

    def release_due(self, now: float, ready_at: float) -> float | None:
        """Move retries whose backoff has passed to the front; return the next due time."""
        due: list[Entry[T]] = []
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            due.append(heapq.heappop(delayed)[2])
        if due:
            self.requeue_front(due, ready_at)
        return delayed[0][0] if delayed else None

    def is_full(self, max_records: int, max_bytes: int) -> bool:
        return len(self.pending) >= max_records or self.pending_bytes >= max_bytes

    def has_work(self) -> bool:
        """Something is queued here that a worker must eventually wake for."""
        return bool(self.pending or self.agg or self.delayed or self.splits)

    def cut(self, max_records: int, max_bytes: int) -> list[Entry[T]]:
        """Take the longest prefix of ``pending`` that fits one request.

        The first entry always fits (each entry is <= the record limit <= the request limit),
        so a cut always makes progress.
        """
        pending = self.pending
        batch: list[Entry[T]] = []
        total = 0
        while pending and len(batch) < max_records:
            size = pending[0].size
            if batch and total + size > max_bytes:
                break
            batch.append(pending.popleft())
            total += size
        self.pending_bytes -= total
        return batch

    def take_agg(self) -> list[Entry[T]]:
        taken, self.agg, self.agg_bytes = self.agg, [], 0
        return taken


class SettlementBatch(Generic[T]):
    """Settlements and metric counts gathered under the sink's lock, delivered after it.

    ``failed`` counts by (route, code): metric labels come from the bounded vocabulary of
    ``gateway.model.REASON_CODES``, never from the wording of a reason.
    """

    __slots__ = ("count", "failed", "put", "retried", "settled")

    def __init__(self) -> None:
        self.settled: list[tuple[T, Settlement]] = []
        self.put: dict[str, int] = {}
        self.failed: dict[tuple[str, str], int] = {}
        self.retried = 0
        self.count = 0

    def add(self, entry: Entry[T], settlement: Settlement) -> None:
        """Settle an entry: a user record's token, or every member token of an aggregate."""
        if entry.members is None:   # a user record, the common case: no list of one
            self.settled.append((entry.token, settlement))
            self.count += 1
            route = entry.route
            if isinstance(settlement, Failed):
                key = (route, settlement.code)
                self.failed[key] = self.failed.get(key, 0) + 1
            else:
                self.put[route] = self.put.get(route, 0) + 1
            return
        self.settled.extend((token, settlement) for _, token in entry.members)
        routes = [route for route, _ in entry.members]
        self.count += len(routes)
        if isinstance(settlement, Failed):
            failed, code = self.failed, settlement.code
            for route in routes:
                failed[(route, code)] = failed.get((route, code), 0) + 1
        else:
            put = self.put
            for route in routes:
                put[route] = put.get(route, 0) + 1
