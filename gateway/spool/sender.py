"""The spool's sender: reads the spool in id order and delivers it through the Kinesis sink.

Why a thread of its own: delivery may take hours (an outage), while the committer must keep
acknowledging new messages. The sender reads what is committed in batches (never the whole spool
into memory), paces each stream to what its shards take (``gateway.spool.pacing``), hands the
records to an inner ``KinesisSink`` (batching, retry and aggregation unchanged; its token is the
row id), and removes a row only once Kinesis or the row's dead letter holds it.

Invariants owned here:
- a row leaves the spool only by ``delete`` after PUT, by ``replace`` with its dead-letter
  envelope (one transaction), by ``delete`` after its MQTT dead letter was published, or by a
  counted, logged drop; rows in memory are bounded by ``max_records`` and ``max_bytes``;
- rows are read in id order from a cursor, so what was in the spool at start goes first; rows
  just committed are taken from memory instead only when their first id follows the cursor and
  no read is due or under way, so each row goes once and the order is the same either way;
- no store call runs under the sender's lock, and nothing here runs on the MQTT thread: the
  publish callback only queues its outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from gateway.model import MAX_PARTITION_KEY_CHARS, PUT, Failed, Record, Settlement, dead_letter_envelope
from gateway.ops.logs import RateLimitedLog
from gateway.spool.pacing import Pacer
from gateway.spool.ports import Inner, SenderMetrics, Store
from gateway.spool.schema import SpooledRecord, SpoolRow, SpoolUnavailable

__all__ = ["Sender"]

log = logging.getLogger("gateway.spool")

_SHARDS_REFRESH_S = 300.0
_SHARDS_RETRY_S = 5.0
_READ_EVERY_S = 0.01   # while rows are in flight, new commits are read or handed over at most this often
# Record(...) and SpooledRecord(...) without their Python-level __new__, as routing builds its records
_new_record = partial(tuple.__new__, Record)
_new_spooled = partial(tuple.__new__, SpooledRecord)


class Sender:
    """Reads, paces and hands over spooled rows; settles them back into the spool."""

    def __init__(self, store: Store, metrics: SenderMetrics, *, clock: Callable[[], float] = time.monotonic,
                 pacer: Pacer | None = None, shard_count: Callable[[str], int | None] | None = None,
                 publish: Callable[[str, bytes, int, Callable[[bool, str], None]], None] | None = None,
                 on_room: Callable[[], None] = lambda: None, on_problem: Callable[[str | None], None] = lambda _: None,
                 max_records: int = 4000, max_bytes: int = 16 * 1024 * 1024, retry_s: float = 1.0) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self.pacer = pacer if pacer is not None else Pacer(clock)
        self._shard_count = shard_count
        self._publish = publish
        self._on_room = on_room
        self._on_problem = on_problem
        self._max_records, self._max_bytes, self._retry_s = max_records, max_bytes, retry_s
        self.inner: Inner | None = None   # set by the spooled sink once it made the Kinesis sink
        self.order_lock = threading.Lock()   # a read and an append-with-drops never interleave
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        self._shards_wake = threading.Condition(lock)   # only a new stream or close wakes the shards thread
        self._read_at = 0.0        # while rows are in flight, the next read of new commits waits until then
        self._cursor = 0
        self._commits = 0          # commits since start (committer); reads compare against it
        self._unread = True        # rows may be committed beyond the cursor
        self._arrived = False      # the committer put rows in flight: hand them over
        self._arrived_at = 0.0     # ...not before then, while earlier rows are in flight (_has_work)
        self._in_flight: dict[int, SpooledRecord] = {}
        self._in_flight_bytes = 0
        # handed to the inner sink, not yet settled: row id -> (stream, records as paced, bytes)
        self._handed: dict[int, tuple[str, int, int]] = {}
        self._handed_per_stream: dict[str, list[int]] = {}   # stream -> [records, bytes]
        self._dropped_in_flight: set[int] = set()   # in flight, but drop_oldest removed them from the spool
        self._unpruned: dict[int, str] = {}         # delivered, not yet deleted from the spool: id -> route
        self._ready: dict[str, deque[SpooledRecord]] = {}
        self._due_at: float | None = None    # when paced rows may go
        self._retry_at: float | None = None  # when a failed store call is tried again
        self._deletes: list[tuple[int, int]] = []   # (row id, row size; -1 when not known)
        self._failed: list[tuple[int, Failed]] = []
        self._published: list[tuple[int, bool, str]] = []
        self._aggregated: frozenset[str] = frozenset()
        self._shards_at: dict[str, float] = {}     # stream -> when its shard count is looked up next
        self._closed = False
        self._drop_log: RateLimitedLog[str] = RateLimitedLog(log, clock=clock)
        self._threads: list[threading.Thread] = []

    # -- any thread ---------------------------------------------------------------------------------

    def committed(self, ids: Sequence[int] = (), rows: Sequence[SpoolRow] = (), sizes: Sequence[int] = ()) -> None:
        """The committer appended ``rows`` (ids and row sizes given, in id order). They are taken
        from memory as they are, not read back, when two things prove nothing would be skipped or
        taken twice: no read is due or under way (one would return these rows as well), and the
        first id follows the cursor (ids are given one after the other, so no other write, such as
        a dead letter's envelope, came in between). They must also fit in flight. Otherwise the
        sender reads on from its cursor."""
        with self._cond:
            self._commits += 1
            if (ids and not self._unread and ids[0] == self._cursor + 1
                    and self._fits(len(ids), sum(sizes))):
                if not self._in_flight:
                    self._arrived_at = 0.0
                self._take(list(map(_new_spooled, zip(ids, rows, sizes, strict=True))))
                if not self._arrived:   # else the sender is woken already
                    self._arrived = True
                    self._cond.notify_all()
                return
            already, self._unread = self._unread, True
            if not (already and self._in_flight):   # else the sender reads on its own timer (_READ_EVERY_S)
                self._cond.notify_all()

    def set_aggregated(self, routes: Iterable[str]) -> None:
        """Aggregated routes' records count only by bytes against a shard's records/s."""
        with self._cond:
            self._aggregated = frozenset(routes)

    def throttled(self, stream: str, retried: int = 0) -> None:
        """The inner sink retried ``retried`` records of ``stream``: charge them, pace lower for a while."""
        with self._cond:
            self.pacer.throttled(stream, retried)

    def settled(self, results: Sequence[tuple[int, Settlement]]) -> None:
        """The inner sink's ``on_settled`` (its worker threads): queue the spool's side of it."""
        with self._cond:
            for row_id, _ in results:
                handed = self._handed.pop(row_id, None)
                if handed is not None:
                    totals = self._handed_per_stream[handed[0]]
                    totals[0] -= handed[1]
                    totals[1] -= handed[2]
            for row_id, settlement in results:
                if settlement == PUT:
                    record = self._in_flight.pop(row_id, None)
                    if record is not None:
                        self._in_flight_bytes -= record.size
                        if row_id not in self._dropped_in_flight:   # else: already not counted as dropped
                            self._unpruned[row_id] = record.row.route   # delivered: never a drop
                    self._dropped_in_flight.discard(row_id)
                    self._deletes.append((row_id, -1 if record is None else record.size))
                elif isinstance(settlement, Failed):
                    self._failed.append((row_id, settlement))
            self._cond.notify_all()

    def dropped_while_in_flight(self, oldest_id: int | None) -> Counter[str]:
        """Under ``order_lock``, right after an append that dropped rows: the rows in flight that the
        store dropped (every id below its oldest), per route. They are still being delivered, so the
        committer does not count them as dropped; each is reported once."""
        out: Counter[str] = Counter()
        with self._cond:
            for row_id, record in self._in_flight.items():
                if (oldest_id is None or row_id < oldest_id) and row_id not in self._dropped_in_flight:
                    self._dropped_in_flight.add(row_id)
                    out[record.row.route] += 1
            for row_id, route in list(self._unpruned.items()):   # delivered before the store dropped them
                if oldest_id is None or row_id < oldest_id:
                    del self._unpruned[row_id]
                    out[route] += 1
        return out

    @property
    def in_flight(self) -> int:
        """Rows read from the spool and not yet settled (paced, at Kinesis, or at a dead letter)."""
        return len(self._in_flight)

    @property
    def idle(self) -> bool:
        """Nothing in flight, nothing to settle, nothing committed left unread."""
        with self._cond:
            return not (self._in_flight or self._deletes or self._failed or self._published or self._unread)

    @property
    def alive(self) -> bool:
        return self._closed or all(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._run, name="spool-sender", daemon=True)]
        if self._shard_count is not None:
            self._threads.append(threading.Thread(target=self._shards, name="spool-shards", daemon=True))
        for thread in self._threads:
            thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._shards_wake.notify_all()
        end = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))

    # -- the sender thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._wait():
                    return
            try:
                self.step()
            except Exception:  # a bug must not stop delivery for good: logged, tried again
                log.exception("spool sender error")
                with self._cond:
                    self._retry_at = self._clock() + self._retry_s

    def _wait(self) -> bool:
        """Under the lock: wait until there is work; False once closed."""
        while not self._closed:
            now = self._clock()
            if self._retry_at is not None and now < self._retry_at:
                self._cond.wait(self._retry_at - now)
                continue
            if self._has_work(now):
                return True
            wake = self._due_at
            if self._unread and self._room():   # held back by _READ_EVERY_S
                wake = self._read_at if wake is None else min(wake, self._read_at)
            if self._arrived:                   # likewise
                wake = self._arrived_at if wake is None else min(wake, self._arrived_at)
            self._cond.wait(None if wake is None else max(0.0, wake - now))
        return False

    def _has_work(self, now: float) -> bool:
        """New commits are read (or, taken from memory, handed over) at once when nothing is in
        flight, else at most every ``_READ_EVERY_S``: the rows in flight wait for the inner sink's
        linger anyway, and a broker that sends one message per PUBACK makes one commit per message,
        which would otherwise cost a read or a hand-over, and a wake of this thread, per message."""
        fresh = self._unread and self._room() and (not self._in_flight or now >= self._read_at)
        arrived = self._arrived and now >= self._arrived_at
        return bool(arrived or self._deletes or self._failed or self._published or fresh
                    or (self._due_at is not None and now >= self._due_at))

    def _room(self) -> bool:
        return len(self._in_flight) < self._max_records and self._in_flight_bytes < self._max_bytes

    def _fits(self, records: int, n_bytes: int) -> bool:
        return (len(self._in_flight) + records <= self._max_records
                and self._in_flight_bytes + n_bytes <= self._max_bytes)

    def _take(self, records: Sequence[SpooledRecord]) -> None:
        """Under the lock: ``records``, the next after the cursor in id order, are in flight now."""
        for record in records:
            self._in_flight[record.id] = record
            self._in_flight_bytes += record.size
            stream = record.row.stream
            queue = self._ready.get(stream)
            if queue is None:
                queue = self._ready[stream] = deque()
                self._shards_at.setdefault(stream, 0.0)
                self._shards_wake.notify_all()
            queue.append(record)
        self._cursor = records[-1].id

    def step(self) -> None:
        """One round: settle into the spool, read more, hand over what the pacer allows. The sender
        thread runs it; unit tests call it directly."""
        with self._cond:
            self._retry_at = None
            self._arrived = False
            self._arrived_at = self._clock() + _READ_EVERY_S
            deletes, self._deletes = self._deletes, []
            failed, self._failed = self._failed, []
            published, self._published = self._published, []
        try:
            for row_id, ok, why in published:
                deletes.append((row_id, self._finish_publish(row_id, ok, why)))
            while failed:
                self._dead_letter(*failed[0], deletes)
                failed.pop(0)
            if deletes:
                ids = [row_id for row_id, _ in deletes]
                sizes = [size for _, size in deletes]
                self._store.delete(ids, sizes if min(sizes) >= 0 else None)
                with self._cond:
                    for row_id in ids:
                        self._unpruned.pop(row_id, None)
                deletes = []
                self._on_room()
            self._read()
            self._on_problem(None)
        except SpoolUnavailable as problem:
            with self._cond:   # keep what is not done yet, and try again in a while
                self._deletes[:0] = deletes
                self._failed[:0] = failed
                self._retry_at = self._clock() + self._retry_s
            self._on_problem(str(problem))
        self._hand_over()

    def _read(self) -> None:
        with self.order_lock:
            with self._cond:
                if not (self._unread and self._room()):
                    return
                records = self._max_records - len(self._in_flight)
                n_bytes = self._max_bytes - self._in_flight_bytes
                commits, after = self._commits, self._cursor
            rows = self._store.read(after, records, n_bytes)
            with self._cond:
                self._read_at = self._clock() + _READ_EVERY_S
                if rows:
                    self._take(rows)
                else:
                    self._unread = self._commits != commits

    def _hand_over(self) -> None:
        entries: list[tuple[Record, int]] = []
        with self._cond:
            due: float | None = None
            now = self._clock()
            aggregated = self._aggregated
            for stream, queue in list(self._ready.items()):
                handed = self._handed_per_stream.setdefault(stream, [0, 0])
                costs = ((0 if record.row.route in aggregated else 1, record.size) for record in queue)
                granted, wait = self.pacer.take_many(stream, costs, (handed[0], handed[1]))
                if wait > 0:   # else the window stopped it, or all went: a settlement wakes the sender
                    due = now + wait if due is None else min(due, now + wait)
                for _ in range(granted):
                    record = queue.popleft()
                    row = record.row
                    counted = 0 if row.route in aggregated else 1
                    self._handed[record.id] = (stream, counted, record.size)
                    handed[0] += counted
                    handed[1] += record.size
                    size = len(row.data) + len(row.partition_key.encode())
                    entries.append((_new_record((row.route, stream, row.partition_key, row.data,
                                                 row.explicit_hash_key, size)), record.id))
                if not queue:
                    del self._ready[stream]
            self._due_at = due
        if entries and self.inner is not None:
            self.inner.put(entries)

    # -- dead letters -------------------------------------------------------------------------------

    def _dead_letter(self, row_id: int, failed: Failed, deletes: list[tuple[int, int]]) -> None:
        """Where the row's route said at routing time: a Kinesis stream (the envelope replaces the
        row in one transaction), an MQTT topic (deleted once published), or a counted drop."""
        with self._cond:
            record = self._in_flight.pop(row_id, None)
            if record is None:
                return
            self._in_flight_bytes -= record.size
            self._dropped_in_flight.discard(row_id)
        row = record.row
        target = row.dead_letter
        kind, _, where = (target or "").partition(":")
        if row.is_dead_letter or target is None or (kind == "mqtt" and self._publish is None) \
                or kind not in ("kinesis", "mqtt"):
            self._drop(row, failed, dead_letter_failed=row.is_dead_letter)
            deletes.append((row_id, record.size))
            return
        envelope = dead_letter_envelope(row.topic, row.data, row.arrival_ms, row.route, failed.reason)
        if kind == "kinesis":
            key = row.topic[:MAX_PARTITION_KEY_CHARS] or row.route
            try:
                self._store.replace([row_id], [SpoolRow(row.route, where, key, None, row.arrival_ms, envelope,
                                                        row.topic, None, True)])
            except SpoolUnavailable:
                with self._cond:    # back in flight: tried again with the rest
                    self._in_flight[row_id] = record
                    self._in_flight_bytes += record.size
                raise
            self._metrics.records_dead_lettered(row.route, 1)
            with self._cond:
                self._unread = True
            return
        with self._cond:   # in flight until the broker took it
            self._in_flight[row_id] = record
            self._in_flight_bytes += record.size

        def done(ok: bool, why: str) -> None:   # on the MQTT thread: only queue it
            with self._cond:
                self._published.append((row_id, ok, why))
                self._cond.notify_all()

        assert self._publish is not None
        self._publish(where, envelope, 1, done)

    def _finish_publish(self, row_id: int, ok: bool, why: str) -> int:
        """The broker took the row's dead letter, or refused it; returns the row's size (-1: unknown)."""
        with self._cond:
            record = self._in_flight.pop(row_id, None)
            if record is not None:
                self._in_flight_bytes -= record.size
        if record is None:
            return -1
        if ok:
            self._metrics.records_dead_lettered(record.row.route, 1)
        else:
            self._drop(record.row, Failed(f"dead letter topic publish failed: {why}", True, "dead_letter_failed"),
                       dead_letter_failed=True)
        return record.size

    def _drop(self, row: SpoolRow, failed: Failed, *, dead_letter_failed: bool) -> None:
        code = "dead_letter_failed" if dead_letter_failed else failed.code
        self._metrics.records_dropped(row.route, code, 1)
        self._metrics.spool_dropped(row.route, "dead_letter_failed" if dead_letter_failed else "no_dead_letter", 1)
        where = "after its dead letter failed" if dead_letter_failed else "(no dead letter configured)"
        self._drop_log.warning(f"{row.route}:{code}", f"dropped a spooled record of route {row.route!r} for stream "
                               f"{row.stream!r} {where}: {failed.reason}")

    # -- shard counts for the pacer -----------------------------------------------------------------

    def _shards(self) -> None:
        assert self._shard_count is not None
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = self._clock()
                    due = [s for s, at in self._shards_at.items() if at <= now]
                    if due:
                        break
                    wake = min(self._shards_at.values(), default=None)
                    self._shards_wake.wait(None if wake is None else max(0.05, wake - now))
            for stream in due:
                try:
                    shards = self._shard_count(stream)
                except Exception as exc:  # noqa: BLE001 - unknown: paced as one shard, asked again soon
                    log.debug("spool: cannot read the shard count of %s: %s", stream, exc)
                    shards = None
                with self._cond:
                    if shards:
                        self.pacer.set_shards(stream, shards)
                    self._shards_at[stream] = self._clock() + (_SHARDS_REFRESH_S if shards else _SHARDS_RETRY_S)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"in_flight": len(self._in_flight), "in_flight_bytes": self._in_flight_bytes,
                    "cursor": self._cursor, "ready": sum(len(q) for q in self._ready.values())}
