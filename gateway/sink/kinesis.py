"""Kinesis sink: records in, settlements out.

This module is the sink's API and its worker threads. What the workers do next is decided by
``gateway.sink.scheduler`` (pure, under this module's lock), what a response means by
``gateway.sink.retry``, what is wrong with which stream by ``gateway.sink.health``, and which
client a stream's requests go with by ``gateway.sink.clients``.

Invariants owned here:
- Every record handed to ``put`` is settled exactly once through ``on_settled``, as PUT or
  Failed, or is still counted in ``pending_records``: nothing leaves silently. A record is
  Failed only when it can never be sent (permanent) or its delivery budget ran out; a
  configuration error (AccessDenied, missing stream, KMS) holds records, it never drops them.
- ``put`` runs on the MQTT network thread: it takes one lock per call, checks the size, appends,
  and never touches the network. Requests are made by ``max_in_flight`` worker threads.
- The request rate is bounded by backoff while failing: a stream whose request failed as a
  whole is paused, and entries that failed inside a response wait out their own backoff.
- An exception from ``on_settled`` is never swallowed: it is counted, the first is logged in one
  line, and the sink reports itself dead (``alive`` False), so liveness fails and the process
  restarts; later settlements are still handed over meanwhile.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from gateway.model import Record, Settlement, stream_target
from gateway.settings.settings import SinkConfig
from gateway.sink import kpl
from gateway.sink.batching import SettlementBatch, StreamState
from gateway.sink.clients import RegionalClients
from gateway.sink.health import StreamHealth, check_stream
from gateway.sink.retry import Retry, Rng, classify, settle_response
from gateway.sink.scheduler import Aggregate, CheckStream, Job, LoadShardMap, Refuse, Scheduler, Send
from gateway.sink.shards import ShardMap, load_shard_map

__all__ = ["KinesisSink", "OnSettled", "SinkMetrics"]

log = logging.getLogger(__name__)

T = TypeVar("T")

OnSettled = Callable[[list[tuple[T, Settlement]]], None]
"""Receives settlements in bulk, on a sink thread; it must not raise."""


class SinkMetrics(Protocol):
    """What the sink reports; gateway.ops.metrics implements it. Counts are user records."""

    def records_put(self, route: str, stream: str, n: int) -> None: ...
    def records_failed(self, route: str, stream: str, reason: str, n: int) -> None: ...
    def records_retried(self, stream: str, n: int) -> None: ...
    def batch_sent(self, stream: str, n_records: int, seconds: float) -> None: ...
    def callback_error(self) -> None: ...


class KinesisSink(Generic[T]):
    """Batches records per stream into PutRecords requests and reports every outcome.

    ``T`` is the caller's token: it travels with its record and comes back with the settlement.
    ``clients`` gives each stream its client (by region); ``aggregate_routes`` names the routes
    whose records are KPL-aggregated. Both follow the route table: on reload, call
    ``set_aggregate_routes`` and ``check_streams``.
    """

    def __init__(
        self,
        clients: RegionalClients,
        config: SinkConfig,
        on_settled: OnSettled[T],
        metrics: SinkMetrics | None = None,
        *,
        aggregate_routes: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: Rng | None = None,
    ) -> None:
        self._clients = clients
        self._config = config
        self._on_settled = on_settled
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep  # only used by drain() when no worker threads run (tests, tools)
        self._retry = Retry(config.backoff_base_s, config.backoff_cap_s, config.record_ttl_s, config.linger_s,
                            rng if rng is not None else random.Random())
        self._cond = threading.Condition(threading.Lock())
        self._scheduler: Scheduler[T] = Scheduler(
            linger_s=config.linger_s, max_records=config.max_batch_records, max_bytes=config.max_batch_bytes,
            max_record_bytes=config.max_record_bytes, aggregate_routes=aggregate_routes)
        self._pending = 0
        self._drainers = 0
        # One idle worker at a time waits with a timeout (the linger or backoff deadline); the
        # others wait for a notify. Otherwise every worker wakes at every deadline, and at low
        # rates those wake-ups cost more CPU than the requests.
        self._timer_at: float | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._health = StreamHealth(config.backoff_cap_s)
        self._callback_failure: str | None = None  # set once on_settled raised: the sink is dead

    # ---- public surface -------------------------------------------------------------------

    @property
    def pending_records(self) -> int:
        """User records accepted and not yet settled (queued, backing off or in flight)."""
        return self._pending

    @property
    def healthy(self) -> bool:
        """False while any stream has a problem (see ``stream_problems``) or the sink is dead."""
        if self._callback_failure is not None:
            return False
        with self._cond:
            return not self._health.problems()

    @property
    def alive(self) -> bool:
        """Liveness: every started worker thread still runs (independent of Kinesis itself), and
        ``on_settled`` never raised: after that, acks may be stuck, and only a restart (the broker
        redelivers what was not acked) is sure to unstick them."""
        if self._callback_failure is not None:
            return False
        return self._closed or all(thread.is_alive() for thread in self._threads)

    @property
    def last_error(self) -> str | None:
        """Why the sink is unhealthy (one line), or None when healthy."""
        if self._callback_failure is not None:
            return self._callback_failure
        with self._cond:
            problems = self._health.problems()
        stream = min(problems, default=None)
        return None if stream is None else f"stream {stream}: {problems[stream]}"

    def stream_problems(self) -> dict[str, str]:
        """Stream -> what is wrong with it (one line: error code and detail, or ``not checked
        yet``); empty when every stream is fine. This is the sink's part of readiness."""
        with self._cond:
            return self._health.problems()

    def check_streams(self, streams: Iterable[str]) -> None:
        """Check these streams (every stream of the route table, dead letters included) with
        DescribeStreamSummary, and check a failing one again until it works. Call at start-up and
        after each reload, off the MQTT thread: it first makes the clients of new regions."""
        streams = frozenset(streams)
        self._clients.prepare(streams)
        with self._cond:
            self._health.watch(streams)
            self._scheduler.check(streams, self._clock())
            self._cond.notify()

    def set_aggregate_routes(self, routes: Iterable[str]) -> None:
        """Choose which routes' records are KPL-aggregated (called on route-table reload)."""
        with self._cond:
            self._scheduler.set_aggregate_routes(routes)

    def put(self, entries: Sequence[tuple[Record, T]], *, now: bool = False) -> None:
        """Accept records for delivery; cheap, thread-safe, never blocks on the network. ``now``:
        then ``send_now``, under the same lock."""
        at = self._clock()
        with self._cond:
            self._pending += len(entries)
            accepted = self._scheduler.accept(entries, at)
            if now:
                self._scheduler.send_now()
            if accepted or now:
                self._cond.notify()

    def send_now(self) -> None:
        """Send what is queued without waiting out the linger, once no request is in flight. The
        pipeline calls it when its backlog is full: then no more records come until some are
        sent, and with nothing in flight to free the backlog, waiting would only stall. (With
        requests in flight, their answers free it, and batches keep filling up.)"""
        with self._cond:
            self._scheduler.send_now()
            self._cond.notify()

    def start(self) -> None:
        """Start the sender threads (daemons: a hung request must not block process exit)."""
        with self._cond:
            if self._threads or self._closed:
                return
            for i in range(self._config.max_in_flight):
                thread = threading.Thread(target=self._worker, name=f"kinesis-sink-{i}", daemon=True)
                self._threads.append(thread)
        for thread in self._threads:
            thread.start()

    def step(self) -> int:
        """Run every job that is due now on the calling thread; return the requests sent.

        The worker threads run the same path; tests drive it with a fake clock instead.
        """
        sent = 0
        while True:
            job, _ = self._next_job(block=False)
            if job is None:
                return sent
            sent += isinstance(job, Send)
            self._run(job)

    def drain(self, deadline_s: float) -> bool:
        """Send everything now (ignoring linger) and wait up to deadline_s seconds for all
        settlements; True when nothing is left. What is unsettled stays unacked upstream."""
        end = self._clock() + deadline_s
        with self._cond:
            self._scheduler.begin_drain()
            self._drainers += 1
            self._cond.notify_all()
        try:
            if not self._threads:
                return self._drain_inline(end)
            with self._cond:
                while self._pending > 0:
                    remaining = end - self._clock()
                    if remaining <= 0:
                        return False
                    self._cond.wait(min(remaining, 0.1))
                return True
        finally:
            with self._cond:
                self._scheduler.end_drain()
                self._drainers -= 1

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the worker threads; records still pending stay unsettled (and unacked)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        end = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))

    # ---- workers --------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            job, _ = self._next_job(block=True)
            if job is None:
                return
            try:
                self._run(job)
            except Exception:  # a bug must not kill the thread and strand records
                log.exception("kinesis sink worker error")
            finally:
                job = None  # while waiting for the next job, hold none of the last one's records

    def _drain_inline(self, end: float) -> bool:
        while True:
            job, wake = self._next_job(block=False)
            if job is not None:
                self._run(job)
                continue
            if self._pending == 0:
                return True
            now = self._clock()
            if now >= end:
                return False
            self._sleep(max(0.0, min(end, wake if wake is not None else end) - now))

    def _next_job(self, block: bool) -> tuple[Job[T] | None, float | None]:
        """Pick the next due job under the lock; with block, wait until one is due."""
        scheduler = self._scheduler
        with self._cond:
            while True:
                if self._closed and block:
                    return None, None
                job, wake = scheduler.next_job(self._clock())
                if job is not None or not block:
                    if job is not None and self._timer_at is None and scheduler.has_work():
                        self._cond.notify()   # hand the timer to an idle worker
                    return job, wake
                if wake is None or (self._timer_at is not None and self._timer_at <= wake):
                    self._cond.wait()         # another worker wakes by then, and notifies
                    continue
                self._timer_at = wake
                self._cond.wait(max(0.0, wake - self._clock()))
                if self._timer_at == wake:
                    self._timer_at = None

    def _run(self, job: Job[T]) -> None:
        try:
            if isinstance(job, Send):
                self._send(job.stream, job)
            elif isinstance(job, Refuse):
                out: SettlementBatch[T] = SettlementBatch()
                for entry, failed, _ in job.refused:
                    out.add(entry, failed)
                self._finish(None, out, job)
            elif isinstance(job, LoadShardMap):
                self._load_shard_map(job.stream)
            elif isinstance(job, Aggregate):
                self._aggregate(job)
            elif isinstance(job, CheckStream):
                self._check(job.stream)
        finally:
            with self._cond:
                self._scheduler.done(job)

    def _aggregate(self, job: Aggregate[T]) -> None:
        s = job.stream
        max_bytes = min(self._config.aggregation_max_bytes, self._config.max_record_bytes)
        try:
            entries = kpl.aggregate(job.records, s.shard_map, max_bytes)
        except Exception:  # never strand user records: send them unaggregated instead
            log.exception("kinesis stream %s: aggregation failed; sending records plain", s.name)
            entries = job.records
        with self._cond:
            self._scheduler.requeue(s, entries, self._clock())
            self._cond.notify()

    def _check(self, stream: str) -> None:
        result = check_stream(self._clients.for_stream(stream), stream)
        endpoint = self._clients.endpoint(stream) if result.problem is not None or result.denied else ""
        with self._cond:
            now = self._clock()
            self._scheduler.checked(stream, result.problem is None, now)
            if self._health.checked(stream, result, endpoint):
                self._scheduler.resume(stream, now)
                self._cond.notify()

    def _load_shard_map(self, s: StreamState[T]) -> None:
        shard_map: ShardMap | None
        try:
            shard_map = load_shard_map(self._clients.for_stream(s.name), s.name)
        except Exception as exc:  # noqa: BLE001 - fall back to one hash key per aggregate: always correct
            log.warning("kinesis stream %s: cannot list shards (%s); aggregating per key", s.name, classify(exc)[1])
            shard_map = None
        with self._cond:
            self._scheduler.shard_map_loaded(s, shard_map)
            self._cond.notify_all()

    # ---- requests and responses -----------------------------------------------------------

    def _send(self, s: StreamState[T], job: Send[T]) -> None:
        batch = job.batch
        request: dict[str, Any] = {**stream_target(s.name), "Records": [entry.request_entry() for entry in batch]}
        started = self._clock()
        response: Any = None
        error: BaseException | None = None
        try:
            response = self._clients.for_stream(s.name).put_records(**request)
        except Exception as exc:  # noqa: BLE001 - classified by retry.classify, never lost
            error = exc
        with self._cond:
            out, verdict = settle_response(s, batch, response, error, self._clock(), self._retry)
            if verdict is not None and self._health.request_verdict(s.name, verdict, s.failures) and verdict.ok:
                self._scheduler.stop_checking(s.name)
        if self._metrics is not None:
            self._metrics.batch_sent(s.name, len(batch), self._clock() - started)
        self._finish(s.name, out, None)

    def _finish(self, stream: str | None, out: SettlementBatch[T], refused: Refuse[T] | None) -> None:
        """Deliver settlements and metrics outside the lock, then release the pending count."""
        metrics = self._metrics
        if out.settled:
            try:
                self._on_settled(out.settled)
            except Exception as exc:  # noqa: BLE001 - never silently: count it, log the first, fail liveness
                if metrics is not None:
                    metrics.callback_error()
                if self._callback_failure is None:
                    detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                    self._callback_failure = f"settlement callback failed: {detail}"
                    log.error("kinesis sink: %s; the sink reports itself dead so that the process restarts",
                              self._callback_failure)
        if metrics is not None:
            if refused is not None:
                for entry, failed, name in refused.refused:
                    metrics.records_failed(entry.route, name, failed.code, 1)
            elif stream is not None:
                for route, n in out.put.items():
                    metrics.records_put(route, stream, n)
                for (route, code), n in out.failed.items():
                    metrics.records_failed(route, stream, code, n)
                if out.retried:
                    metrics.records_retried(stream, out.retried)
        if out.count:
            with self._cond:
                self._pending -= out.count
                if self._drainers:
                    self._cond.notify_all()
