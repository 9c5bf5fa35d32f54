"""SpooledSink: the pipeline's sink when the spool is on: records are acknowledged once on disk.

Why: at the edge the link to AWS is what fails. With ``GATEWAY_SPOOL_DIR`` set, a message's
records go to the local spool and its PUBACK goes out once that write is durable; a sender
(``gateway.spool.sender``) delivers the spool to Kinesis later, in id order, paced per stream.

Invariants owned here:
- ``put`` runs on the MQTT thread and only appends to a pending list and notifies, no disk I/O,
  unless the records are to go ``now`` (the broker waits for our acks, or the backlog is full);
- one commit at a time appends *everything* pending in one transaction (group commit: what piles
  up during a commit goes into the next one) and only then settles those records PUT to the
  pipeline, so the ack tracker releases their PUBACKs; a record is never settled before it is
  durable. The committer thread commits, except for ``now`` (``send_now``) while the committer is
  idle: then the MQTT thread commits itself;
- a full spool (``block``) or one that cannot be written (disk full, read-only: ``SpoolUnavailable``)
  makes the sink not ``accepting``: the pipeline then reports its backlog full and the MQTT source
  stops reading and acknowledging, as without a spool. The commit is tried again once the sender
  freed room, or every ``retry_s``; once it succeeds the source is woken. Each such episode is
  logged once when it starts and once when it ends;
- ``drop_oldest``: the store deletes the oldest rows to make room; each is counted per route in
  ``spool_dropped_total{reason="when_full"}`` and logged as a count.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

from gateway.model import PUT, Failed, Record, Settlement
from gateway.spool.pacing import Pacer
from gateway.spool.ports import InnerSink, Origin, SpoolMetrics, Store
from gateway.spool.schema import SpoolRow, SpoolUnavailable, row_size
from gateway.spool.sender import Sender
from gateway.spool.store import SpoolFull

__all__ = ["SpooledSink"]

log = logging.getLogger("gateway.spool")

_LOG_EVERY_S = 10.0


OnSettled = Callable[[Sequence[tuple[Any, Settlement]]], None]
MakeInner = Callable[[Callable[[list[tuple[int, Settlement]]], None], Callable[[str, int], None]], InnerSink]
"""``make_inner(on_settled, on_retried)``: the Kinesis sink whose tokens are row ids; ``on_retried(stream, n)``
is to be called when it retries records of a stream (its ``records_retried`` metric)."""


class SpooledSink:
    """The Sink of ``gateway.pipeline`` backed by a spool; see the module docstring."""

    def __init__(self, store: Store, make_inner: MakeInner, on_settled: OnSettled, metrics: SpoolMetrics, *,
                 wake: Callable[[], None] = lambda: None,
                 publish: Callable[[str, bytes, int, Callable[[bool, str], None]], None] | None = None,
                 shard_count: Callable[[str], int | None] | None = None, clock: Callable[[], float] = time.monotonic,
                 pacer: Pacer | None = None, max_in_flight_records: int = 4000,
                 max_in_flight_bytes: int = 16 * 1024 * 1024, retry_s: float = 1.0, name: str = "spool",
                 initial_problem: str | None = None) -> None:
        """``initial_problem``: the spool could not be opened (``LazyStore``); the sink starts as not
        accepting, says so once, and tries again every ``retry_s``."""
        self._store = store
        self._on_settled = on_settled
        self._metrics = metrics
        self._wake = wake
        self._clock = clock
        self._retry_s = retry_s
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[tuple[Record, Any]] = []
        self._committing = 0        # records taken by the committer and not yet settled
        self._accepting = True
        self._full: str | None = None      # why the last commit did not fit (block policy)
        self._problems: dict[str, str] = {}  # "commit"/"send" -> SpoolUnavailable line
        self._freed = 0                    # rows freed by the sender: a blocked commit tries again
        self._freed_seen = 0
        self._retry_at = 0.0
        self._closed = False
        self._callback_failure: str | None = None
        self._dropped_log: Counter[str] = Counter()
        self._dropped_logged_at = float("-inf")
        self._sender = Sender(store, metrics, clock=clock, pacer=pacer, shard_count=shard_count, publish=publish,
                              on_room=self._room, on_problem=lambda p: self._problem("send", p),
                              max_records=max_in_flight_records, max_bytes=max_in_flight_bytes, retry_s=retry_s)
        self.inner = make_inner(self._sender.settled, self._sender.throttled)
        self._sender.inner = self.inner
        self._thread: threading.Thread | None = None
        if initial_problem is not None:
            self._accepting = False
            self._retry_at = clock() + retry_s
            self._problem("commit", initial_problem)

    # -- the pipeline's Sink ------------------------------------------------------------------------

    def put(self, entries: Sequence[tuple[Record, Any]], *, now: bool = False) -> None:
        """MQTT thread: queue for the next commit; touches the disk only with ``now`` (``send_now``).
        Then the committer is not woken: it would only compete with the commit made here."""
        with self._cond:
            self._pending.extend(entries)
            if not now:
                self._cond.notify_all()
        if now:
            self.send_now()

    def send_now(self) -> None:
        """MQTT thread: the broker waits for our PUBACKs (its in-flight window is full) or the
        backlog is full. When the committer is idle, commit what is pending here and now: the
        PUBACKs then leave in this round of the MQTT loop, not after a hand-off to the committer
        and back, which is what a window of one message pays per message (docs/spool.md#storage)."""
        with self._cond:
            if self._committing or not self._pending or not self._accepting or self._closed:
                if self._pending:
                    self._cond.notify_all()     # what is pending is the committer's
                return
            batch, self._pending = self._pending, []
            self._committing = len(batch)
        try:
            self._commit_taken(batch)
        except Exception:
            log.exception("spool commit error")

    @property
    def accepting(self) -> bool:
        """False while the spool is full (``block``) or cannot be written: the pipeline's backlog
        then reports full, and the MQTT source stops reading until this sink wakes it."""
        return self._accepting

    # -- state for the app: health, readiness, metrics ----------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._callback_failure is None and not self._problems and self.inner.healthy

    @property
    def alive(self) -> bool:
        if self._callback_failure is not None:
            return False
        thread_ok = self._closed or (self._thread is not None and self._thread.is_alive())
        return thread_ok and self._sender.alive and self.inner.alive

    @property
    def last_error(self) -> str | None:
        return self._callback_failure or self.spool_problem or self.inner.last_error

    @property
    def spool_problem(self) -> str | None:
        """Why the spool cannot be written now (one line), for readiness; None when it can."""
        problems = self._problems
        return problems.get("commit") or problems.get("send")

    def stream_problems(self) -> dict[str, str]:
        return self.inner.stream_problems()

    def check_streams(self, streams: Iterable[str]) -> None:
        self.inner.check_streams(streams)

    def set_aggregate_routes(self, routes: Iterable[str]) -> None:
        routes = frozenset(routes)
        self.inner.set_aggregate_routes(routes)
        self._sender.set_aggregated(routes)

    @property
    def pending_records(self) -> int:
        """Records received and not yet durable in the spool (they are not acknowledged yet)."""
        return len(self._pending) + self._committing

    @property
    def spooled_records(self) -> int:
        return self._store.records

    @property
    def sender(self) -> Sender:
        return self._sender

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.inner.start()
        self._sender.start()
        self._thread = threading.Thread(target=self._commit_loop, name="spool-committer", daemon=True)
        self._thread.start()

    def drain(self, deadline_s: float) -> bool:
        """Shutdown: commit what is pending (so it is acknowledged), then deliver the spool to Kinesis
        until ``deadline_s`` runs out; True when the spool is empty. What remains stays spooled."""
        end = self._clock() + deadline_s
        with self._cond:
            while self._pending or self._committing:
                remaining = end - self._clock()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.05))
        while True:
            if self._store.records == 0 and self._sender.idle and not self._pending:
                return True
            remaining = end - self._clock()
            if remaining <= 0:
                return False
            if self.inner.pending_records:
                self.inner.drain(min(remaining, 0.25))   # skips the linger while it waits
            else:
                with self._cond:
                    self._cond.wait(min(remaining, 0.05))

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the threads; what is spooled stays for the next start, what is pending is unacked."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        end = time.monotonic() + timeout_s
        if self._thread is not None:
            self._thread.join(max(0.0, end - time.monotonic()))
        self._sender.close(max(0.0, end - time.monotonic()))
        self.inner.close(max(0.1, end - time.monotonic()))
        self._flush_drop_log(everything=True)

    # -- the committer thread -----------------------------------------------------------------------

    def _commit_loop(self) -> None:
        while True:
            try:
                if not self.commit_once(block=True):
                    return
            except Exception:  # a bug must not stop the acks for good: logged, tried again
                log.exception("spool committer error")
                with self._cond:
                    self._cond.wait(self._retry_s)

    def commit_once(self, block: bool = False) -> bool:
        """Commit everything pending in one transaction and settle it; False once closed. With
        ``block`` wait for work first (the committer thread); unit tests call it without."""
        with self._cond:
            while block:
                if self._closed:
                    return False
                if self._committing:          # the MQTT thread commits (send_now): the next batch waits
                    self._cond.wait()
                    continue
                if self._pending and self._accepting:
                    break
                if self._pending or "commit" in self._problems:   # blocked: again once the sender
                    now = self._clock()                           # freed room, or after retry_s
                    if self._freed != self._freed_seen or now >= self._retry_at:
                        break
                    self._cond.wait(self._retry_at - now)
                    continue
                self._cond.wait()
            batch, self._pending = self._pending, []
            self._committing = len(batch)
        self._commit_taken(batch)
        return True

    def _commit_taken(self, batch: list[tuple[Record, Any]]) -> None:
        """Commit a batch taken off ``_pending`` by whichever thread set ``_committing``: only one at a time."""
        try:
            if batch:
                self._commit(batch)
            else:   # nothing pending, but the spool could not be written: is it writable again?
                self._append([], [], [], [])
        finally:
            with self._cond:
                self._committing = 0
                if self._pending:   # the committer's next batch; with nothing pending a wake would find nothing
                    self._cond.notify_all()

    def _commit(self, batch: list[tuple[Record, Any]]) -> None:
        rows: list[SpoolRow] = []
        sizes: list[int] = []
        kept: list[tuple[Record, Any]] = []
        refused: list[tuple[Any, Settlement]] = []
        capacity = self._store.capacity_bytes
        for record, token in batch:
            row = _row(record, token)
            size = row_size(row)
            if size > capacity:   # could never fit: its dead letter gets the envelope instead
                refused.append((token, Failed(f"record of {size} bytes is larger than the spool "
                                              f"({capacity} bytes, GATEWAY_SPOOL_MAX_BYTES)", True, "too_large")))
                continue
            rows.append(row)
            sizes.append(size)
            kept.append((record, token))
        if refused:
            self._settle(refused)
        chunk_bytes = max(1, capacity // 4)   # a chunk always fits an empty spool
        start = 0
        while start < len(rows):
            # Under ``block`` a chunk also ends at the room left, so that the spool fills up to the
            # record that does not fit instead of refusing a whole chunk with room for part of it.
            limit = chunk_bytes if self._store.drops_oldest else min(chunk_bytes, capacity - self._store.bytes)
            end, size = start, 0
            while end < len(rows) and (end == start or size + sizes[end] <= limit):
                size += sizes[end]
                end += 1
            if not self._append(rows[start:end], sizes[start:end], kept[start:end], kept[end:]):
                return
            start = end

    def _append(self, rows: list[SpoolRow], sizes: list[int], entries: list[tuple[Record, Any]],
                rest: list[tuple[Record, Any]]) -> bool:
        """One transaction; settle its records PUT. On failure, ``entries`` and ``rest`` wait for the next try."""
        started = time.perf_counter()
        try:
            # Only an append that may drop rows must not interleave with the sender's read of them:
            # otherwise the lock would hold the sender up for every commit's fsync, and the other way round.
            with self._sender.order_lock if self._store.drops_oldest else contextlib.nullcontext():
                ids = self._store.append(rows, sizes)
                dropped = self._store.take_dropped()
                if dropped:
                    oldest = self._store.read(0, 1, 1)
                    dropped = dict(Counter(dropped) - self._sender.dropped_while_in_flight(
                        oldest[0].id if oldest else None))
        except (SpoolFull, SpoolUnavailable) as problem:
            with self._cond:
                self._pending[:0] = entries + rest   # first in line for the next try, in arrival order
                self._accepting = False
                self._freed_seen = self._freed
                self._retry_at = self._clock() + self._retry_s
            if isinstance(problem, SpoolFull):
                self._set_full(str(problem))
            else:
                self._problem("commit", str(problem))
            return False
        if rows:
            self._metrics.spool_commit(time.perf_counter() - started)
        self._problem("commit", None)
        self._set_full(None)
        self._sender.committed(ids, rows, sizes)
        if dropped:
            self._count_dropped(dropped)
        if entries:
            self._settle([(token, PUT) for _, token in entries])
        if not self._accepting:
            with self._cond:
                self._accepting = True
            self._wake()
        return True

    def _settle(self, results: list[tuple[Any, Settlement]]) -> None:
        try:
            self._on_settled(results)
        except Exception as exc:  # noqa: BLE001 - never silently: count it, log the first, fail liveness
            self._metrics.callback_error()
            if self._callback_failure is None:
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                self._callback_failure = f"settlement callback failed: {detail}"
                log.error("%s: %s; the sink reports itself dead so that the process restarts", self._name,
                          self._callback_failure)

    def _room(self) -> None:
        """The sender freed room: a blocked commit tries again now."""
        with self._cond:
            self._freed += 1
            if not self._accepting:
                self._cond.notify_all()

    # -- what is told: problems, a full spool, drops ------------------------------------------------

    def _problem(self, where: str, problem: str | None) -> None:
        was = self._problems.get(where)
        if problem == was:
            return
        if problem is None:
            self._problems = {k: v for k, v in self._problems.items() if k != where}
            log.info("%s can be written again: %s", self._name,
                     "acknowledging and reading on" if where == "commit" else "delivering on")
            return
        self._problems = {**self._problems, where: problem}
        if was is None:
            log.error("%s cannot be written: %s; %s, trying again every %gs", self._name, problem,
                      "not acknowledging and not reading from the broker" if where == "commit"
                      else "delivered records stay spooled", self._retry_s)

    def _set_full(self, why: str | None) -> None:
        if why == self._full or (why is not None and self._full is not None):
            return
        if why is None:
            log.info("%s has room again: acknowledging and reading on", self._name)
        else:
            log.warning("%s; not acknowledging and not reading from the broker until Kinesis drains it "
                        "(GATEWAY_SPOOL_WHEN_FULL=block)", why)
        self._full = why

    def _count_dropped(self, dropped: dict[str, int]) -> None:
        for route, n in dropped.items():
            if n > 0:
                self._metrics.spool_dropped(route, "when_full", n)
                self._dropped_log[route] += n
        self._flush_drop_log()

    def _flush_drop_log(self, everything: bool = False) -> None:
        now = self._clock()
        if not self._dropped_log or (not everything and now - self._dropped_logged_at < _LOG_EVERY_S):
            return
        counts, self._dropped_log, self._dropped_logged_at = self._dropped_log, Counter(), now
        per_route = ", ".join(f"{route}: {n}" for route, n in sorted(counts.items()))
        log.warning("%s full: dropped the %d oldest record(s) to make room (%s) (GATEWAY_SPOOL_WHEN_FULL=drop_oldest)",
                    self._name, sum(counts.values()), per_route)


_new_row = partial(tuple.__new__, SpoolRow)   # SpoolRow(...) without its Python-level __new__


def _row(record: Record, token: Origin) -> SpoolRow:
    message = token.message
    return _new_row((record.route, record.stream, record.partition_key, record.explicit_hash_key, message.received_ms,
                     record.data, message.topic, None if token.is_dead_letter else token.dead_letter,
                     token.is_dead_letter))
