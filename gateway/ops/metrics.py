"""Prometheus metrics of the gateway, in one registry of their own.

Labels are route and stream names (bounded: they come from the route file) and short fixed
reasons, never MQTT topics or partition keys. Every method here is cheap enough for the message
path: labelled children are looked up once and cached in plain dicts, because
``metric.labels(...)`` costs more than the increment itself.

The ``_created`` series that prometheus-client adds to counters and histograms are left out of
the exposition without touching the library's process-wide switch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric

from gateway import __version__

__all__ = ["CONTENT_TYPE", "METRIC_NAMES", "PREFIX", "SPOOL_DROP_REASONS", "Metrics"]

PREFIX = "mqtt_kinesis_gateway_"
FAILURE_CODES = ("too_large", "rejected_by_kinesis", "ttl_exceeded")
"""The reasons the sink gives up on a record (``records_failed``), declared at 0 per route."""
CONTENT_TYPE = CONTENT_TYPE_LATEST

_BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500)
_PUT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
SPOOL_DROP_REASONS = ("when_full", "undecodable", "no_dead_letter", "dead_letter_failed")
"""Why a record leaves the spool undelivered, declared at 0 per route when the spool is on."""

# name without prefix -> (kind, label names, help); the single source of METRIC_NAMES.
_SPEC: dict[str, tuple[str, tuple[str, ...], str]] = {
    "messages_received": ("counter", ("route",), "MQTT messages matched by a route."),
    "messages_unrouted": ("counter", (), "MQTT messages no route matched."),
    "messages_invalid_topic": ("counter", (),
                               "MQTT messages whose topic is not valid UTF-8: acknowledged and dropped."),
    "records_put": ("counter", ("route", "stream"), "Records Kinesis accepted."),
    "records_failed": ("counter", ("route", "stream", "reason"),
                       "Records that could not be delivered (then dead-lettered or dropped)."),
    "records_retried": ("counter", ("stream",), "Record resends after a failed PutRecords entry."),
    "records_dead_lettered": ("counter", ("route",), "Records written to a route's dead letter."),
    "records_dropped": ("counter", ("route", "reason"),
                        "Records given up on with nowhere to go (no dead letter, or it failed)."),
    "batch_records": ("histogram", ("stream",), "Records per PutRecords request."),
    "put_records_duration_seconds": ("histogram", ("stream",), "PutRecords request duration."),
    "delivery_latency_seconds": ("histogram", ("route",),
                                 "From MQTT receipt to the record being held by Kinesis."),
    "backlog_records": ("gauge", (), "Records held in memory, not yet settled."),
    "backlog_capacity": ("gauge", (), "Records the in-memory backlog may hold."),
    "backlog_bytes": ("gauge", (), "Bytes of records held in memory, not yet settled."),
    "backlog_capacity_bytes": ("gauge", (), "Bytes the in-memory backlog may hold (GATEWAY_BACKLOG_BYTES)."),
    "spool_records": ("gauge", (), "Records in the spool, waiting for Kinesis (GATEWAY_SPOOL_DIR)."),
    "spool_bytes": ("gauge", (), "Bytes of records in the spool."),
    "spool_capacity_bytes": ("gauge", (), "Bytes the spool may hold (GATEWAY_SPOOL_MAX_BYTES)."),
    "spool_oldest_record_age_seconds": ("gauge", (), "Age of the oldest record in the spool (0 when empty)."),
    "spool_dropped": ("counter", ("route", "reason"),
                      "Records removed from the spool undelivered: when_full (drop_oldest), undecodable, "
                      "no_dead_letter, dead_letter_failed."),
    "spool_commits": ("counter", (), "Spool transactions committed (appends, deletes, dead-letter swaps)."),
    "spool_commit_duration_seconds": ("histogram", (), "Duration of a group commit of received records."),
    "spool_damaged": ("counter", (), "Damaged spools moved aside at start."),
    "spool_unavailable": ("gauge", (), "1 while the spool cannot be written (disk full, read-only, I/O error)."),
    "mqtt_connected": ("gauge", (), "1 while connected to the broker."),
    "subscriptions_granted": ("gauge", (), "1 when the broker granted every subscription."),
    "mqtt_sessions_lost": ("counter", (), "Reconnects where the broker had no session."),
    "callback_errors": ("counter", (), "Exceptions caught in MQTT or sink callbacks."),
    "config_last_reload_successful": ("gauge", (), "1 if the last route file load succeeded."),
    "config_last_reload_success_timestamp_seconds": ("gauge", (),
                                                     "When the route file last loaded."),
    "config_reloads": ("counter", ("result",), "Route file loads by result (success, failure)."),
    "config": ("info", ("sha256",), "SHA-256 of the route file in use."),
    "build": ("info", ("version",), "Gateway version."),
}


def _sample_names() -> frozenset[str]:
    suffixes = {"counter": ("_total",), "gauge": ("",), "info": ("_info",),
                "histogram": ("_bucket", "_sum", "_count")}
    return frozenset(PREFIX + name + suffix for name, (kind, _, _) in _SPEC.items()
                     for suffix in suffixes[kind])


METRIC_NAMES: frozenset[str] = _sample_names()
"""Every sample name in the exposition, e.g. ``mqtt_kinesis_gateway_records_put_total``."""


class _WithoutCreated:
    """Collector view of a registry minus the ``*_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    """All gateway metrics; the method names are what source, sink, pipeline and reloader call."""

    def __init__(self, version: str = __version__) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._view = _WithoutCreated(self.registry)
        made: dict[str, Any] = {}
        for name, (kind, labels, doc) in _SPEC.items():
            if kind == "info":  # Info appends _info itself and carries its labels as values
                made[name] = Info(PREFIX + name, doc, registry=self.registry)
                continue
            cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind]
            kwargs: dict[str, Any] = {}
            if kind == "histogram":
                kwargs["buckets"] = {"batch_records": _BATCH_BUCKETS,
                                     "put_records_duration_seconds": _PUT_BUCKETS,
                                     "delivery_latency_seconds": _DELIVERY_BUCKETS,
                                     "spool_commit_duration_seconds": _COMMIT_BUCKETS}[name]
            made[name] = cls(PREFIX + name, doc, labels, registry=self.registry, **kwargs)
        self._m = made
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        made["build"].info({"version": version})
        made["config_last_reload_successful"].set(0)
        made["mqtt_connected"].set(0)
        made["subscriptions_granted"].set(0)
        for result in ("success", "failure"):
            self._child("config_reloads", result)
        self._before_render: list[Callable[[], None]] = []

    def before_render(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` before every exposition: counts kept outside the registry on the hot path
        are handed over then, so a scrape always sees them up to date."""
        self._before_render.append(hook)

    def _child(self, name: str, *labels: str) -> Any:
        key = (name, labels)
        child = self._children.get(key)
        if child is None:  # a race makes the same child twice: labels() returns the same object
            child = self._children[key] = self._m[name].labels(*labels)
        return child

    # -- message path -------------------------------------------------------------------------
    def messages_received(self, route: str, n: int = 1) -> None:
        self._child("messages_received", route).inc(n)

    def unrouted(self, n: int = 1) -> None:
        self._m["messages_unrouted"].inc(n)

    def records_put(self, route: str, stream: str, n: int = 1) -> None:
        self._child("records_put", route, stream).inc(n)

    def records_failed(self, route: str, stream: str, reason: str, n: int = 1) -> None:
        """``reason`` must be a short fixed string or an AWS error code, never payload content."""
        self._child("records_failed", route, stream, reason).inc(n)

    def records_retried(self, stream: str, n: int = 1) -> None:
        self._child("records_retried", stream).inc(n)

    def records_dead_lettered(self, route: str, n: int = 1) -> None:
        self._child("records_dead_lettered", route).inc(n)

    def records_dropped(self, route: str, reason: str, n: int = 1) -> None:
        self._child("records_dropped", route, reason).inc(n)

    def batch_sent(self, stream: str, n_records: int, seconds: float) -> None:
        """One PutRecords request: its size and how long it took."""
        self._child("batch_records", stream).observe(n_records)
        self._child("put_records_duration_seconds", stream).observe(seconds)

    def delivered(self, route: str, seconds: float) -> None:
        self._child("delivery_latency_seconds", route).observe(seconds)

    def set_backlog(self, n: int, capacity: int | None = None, n_bytes: int | None = None,
                    capacity_bytes: int | None = None) -> None:
        self._m["backlog_records"].set(n)
        if capacity is not None:
            self._m["backlog_capacity"].set(capacity)
        if n_bytes is not None:
            self._m["backlog_bytes"].set(n_bytes)
        if capacity_bytes is not None:
            self._m["backlog_capacity_bytes"].set(capacity_bytes)

    # -- the spool ----------------------------------------------------------------------------
    def spool_commit(self, seconds: float) -> None:
        self._m["spool_commit_duration_seconds"].observe(seconds)

    def spool_dropped(self, route: str, reason: str, n: int = 1) -> None:
        self._child("spool_dropped", route, reason).inc(n)

    def spool_damaged(self) -> None:
        self._m["spool_damaged"].inc()

    def spool_committed(self, n: int) -> None:
        """Transactions since the last call (the store counts them)."""
        if n > 0:
            self._m["spool_commits"].inc(n)

    def set_spool(self, records: int, n_bytes: int, capacity_bytes: int, oldest_age_s: float,
                  unavailable: bool) -> None:
        self._m["spool_records"].set(records)
        self._m["spool_bytes"].set(n_bytes)
        self._m["spool_capacity_bytes"].set(capacity_bytes)
        self._m["spool_oldest_record_age_seconds"].set(oldest_age_s)
        self._m["spool_unavailable"].set(1 if unavailable else 0)

    def declare_spool_routes(self, routes: Iterable[str]) -> None:
        """Every spool drop reason of every route at 0 (the spool is on)."""
        for route in routes:
            for reason in SPOOL_DROP_REASONS:
                self._child("spool_dropped", route, reason)

    # -- connection and configuration ---------------------------------------------------------
    def set_connected(self, connected: bool) -> None:
        self._m["mqtt_connected"].set(1 if connected else 0)
        if not connected:
            self._m["subscriptions_granted"].set(0)

    def set_subscriptions_granted(self, granted: bool) -> None:
        self._m["subscriptions_granted"].set(1 if granted else 0)

    def session_lost(self) -> None:
        self._m["mqtt_sessions_lost"].inc()

    def invalid_topic(self) -> None:
        self._m["messages_invalid_topic"].inc()

    def callback_error(self) -> None:
        self._m["callback_errors"].inc()

    def reload_result(self, ok: bool, digest: str = "", now: float | None = None) -> None:
        """Record a route file load (startup included); a failed one keeps the old digest."""
        self._child("config_reloads", "success" if ok else "failure").inc()
        self._m["config_last_reload_successful"].set(1 if ok else 0)
        if ok:
            self._m["config_last_reload_success_timestamp_seconds"].set(
                time.time() if now is None else now)
            self._m["config"].info({"sha256": digest})

    def declare_routes(self, routes: Iterable[tuple[str, str, Iterable[str]]]) -> None:
        """Create every (route, stream) series at 0, and each drop and failure reason a route can
        have, so rates and ``increase() > 0`` alerts see the very first event, not only the second."""
        for route, stream, drop_codes in routes:
            for code in drop_codes:
                self._child("records_dropped", route, code)
            for code in FAILURE_CODES:
                self._child("records_failed", route, stream, code)
            self._child("messages_received", route)
            self._child("records_put", route, stream)
            self._child("records_dead_lettered", route)
            self._child("delivery_latency_seconds", route)
            self._child("records_retried", stream)
            self._child("batch_records", stream)
            self._child("put_records_duration_seconds", stream)

    # -- exposition ---------------------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``) for ``/metrics``."""
        for hook in self._before_render:
            hook()
        return generate_latest(self._view)
