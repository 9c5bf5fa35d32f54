"""Hot reload of the route file: watch its directory, debounce, hash, validate aside, swap.

Only this module swaps the active table. Everything else reads ``ActiveTable.current`` once per
message and keeps that reference until the message is settled, so a message always finishes under
the table that routed it, and a reload never half-applies.

The content hash makes every no-op event (``touch``, our own reads, unrelated files in the
directory) cost one read and nothing else. Each attempt reads the file once (``readfile.py``: a
regular file under the size limit, never a blocking read) and hashes and loads those same bytes, so
a file that changes during a reload cannot leave the digest and the table out of step. What
triggers a reload lives in ``watch.py``; see docs/route-file.md#hot-reload.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.routefile.findings import Finding
from gateway.routefile.loader import LoadResult, load_routes_bytes
from gateway.routefile.readfile import RouteFileError, read_route_file
from gateway.routing.table import RouteTable

__all__ = ["ActiveTable", "ReloadOutcome", "Reloader", "TableDiff", "diff_tables"]

log = logging.getLogger(__name__)

Status = Literal["applied", "unchanged", "invalid", "unreadable", "error"]



class ActiveTable:
    """The one reference to the route table in force; ``swap`` is its only writer.

    Reading ``current`` takes no lock: rebinding an attribute is atomic, and the hot path reads it
    once per message. Writers are serialised so two reloads cannot interleave.
    """

    __slots__ = ("_current", "_lock")

    def __init__(self, table: RouteTable) -> None:
        self._current = table
        self._lock = threading.Lock()

    @property
    def current(self) -> RouteTable:
        return self._current

    def swap(self, new: RouteTable) -> RouteTable:
        """Install ``new`` in one step and hand back the table it replaced."""
        with self._lock:
            old, self._current = self._current, new
            return old


@dataclass(frozen=True)
class TableDiff:
    """What a reload changed, in the terms the app acts on (subscribe, unsubscribe, flush)."""

    routes_added: tuple[str, ...] = ()
    routes_removed: tuple[str, ...] = ()
    routes_changed: tuple[str, ...] = ()
    subscriptions_added: tuple[tuple[str, int], ...] = ()
    subscriptions_removed: tuple[tuple[str, int], ...] = ()
    subscriptions_changed: tuple[tuple[str, int, int], ...] = ()  # (filter, old qos, new qos)
    streams_removed: tuple[str, ...] = ()  # no route (or dead letter) writes there any more

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in dataclasses.fields(self))

    def describe(self) -> str:
        """One line for the reload log: only the parts that changed."""
        parts = (
            ("routes added", self.routes_added),
            ("routes removed", self.routes_removed),
            ("routes changed", self.routes_changed),
            ("subscriptions added", [f"{f} (qos {q})" for f, q in self.subscriptions_added]),
            ("subscriptions removed", [f for f, _ in self.subscriptions_removed]),
            ("subscription qos changed", [f"{f} ({a}->{b})" for f, a, b in self.subscriptions_changed]),
            ("streams no longer used", self.streams_removed),
        )
        text = "; ".join(f"{label}: {', '.join(items)}" for label, items in parts if items)
        return text or "no route or subscription changes"


def _streams(table: RouteTable) -> set[str]:
    used = set()
    for route in table.routes:
        used.add(route.stream)
        if route.dead_letter is not None and route.dead_letter.kind == "kinesis":
            used.add(route.dead_letter.target)
    return used


def diff_tables(old: RouteTable, new: RouteTable) -> TableDiff:
    """Compare two route tables by what routes do (``Route.definition``: expressions by their
    source text, no line numbers), so recompiling or reordering the same routes is no change."""
    old_routes = {r.name: r for r in old.routes}
    new_routes = {r.name: r for r in new.routes}
    old_subs, new_subs = dict(old.subscriptions), dict(new.subscriptions)
    return TableDiff(
        routes_added=tuple(n for n in new_routes if n not in old_routes),
        routes_removed=tuple(n for n in old_routes if n not in new_routes),
        routes_changed=tuple(n for n, r in new_routes.items()
                             if n in old_routes and old_routes[n].definition != r.definition),
        subscriptions_added=tuple((f, q) for f, q in new.subscriptions if f not in old_subs),
        subscriptions_removed=tuple((f, q) for f, q in old.subscriptions if f not in new_subs),
        subscriptions_changed=tuple((f, old_subs[f], q) for f, q in new.subscriptions
                                    if f in old_subs and old_subs[f] != q),
        streams_removed=tuple(sorted(_streams(old) - _streams(new))),
    )


@dataclass(frozen=True)
class ReloadOutcome:
    """What one reload attempt did; ``retry`` asks the watcher to look again soon."""

    status: Status
    reason: str
    digest: str = ""  # sha256 of the bytes read ("" when nothing could be read)
    diff: TableDiff | None = None
    findings: tuple[Finding, ...] = ()

    @property
    def retry(self) -> bool:
        return self.status == "unreadable"


class Reloader:
    """Re-reads the route file and swaps the active table when, and only when, it is new and valid.

    ``reload`` never raises: whatever goes wrong is logged and the gateway keeps the table it has.
    """

    def __init__(self, path: str | os.PathLike[str], active: ActiveTable, *,
                 load: Callable[[bytes, str], LoadResult] = load_routes_bytes,
                 on_swap: Callable[[RouteTable, RouteTable, TableDiff], None] | None = None,
                 metrics: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = os.fspath(path)
        self._active = active
        self._load = load
        self._on_swap = on_swap
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        # Digest of the last bytes acted on (applied or rejected), or the fingerprint of a refused
        # file: a rejected file is reported once, not again on every touch or backstop rescan.
        self._seen = active.current.digest
        self._last_ok = True

    def reload(self, reason: str = "manual", *, force: bool | None = None) -> ReloadOutcome:
        """Reload if the content changed. ``force`` (default: reason is "sighup") re-validates a
        file that was already rejected, so an operator's SIGHUP always gets an answer in the log."""
        if force is None:
            force = reason == "sighup"
        with self._lock:
            try:
                return self._reload(reason, force)
            except Exception:  # a bug, not bad input: keep running, keep the traceback
                log.exception("route file %s: reload failed unexpectedly; keeping the current "
                              "table", self.path)
                self._report(False)
                return ReloadOutcome("error", reason)

    def _active_digest(self) -> str:
        return self._active.current.digest

    def _reload(self, reason: str, force: bool) -> ReloadOutcome:
        try:
            raw = read_route_file(self.path)  # follows routes.yaml -> ..data/routes.yaml
        except RouteFileError as exc:
            return self._unusable(reason, force, exc)
        digest = hashlib.sha256(raw).hexdigest()  # of the very bytes loaded below: one read
        if digest == self._active_digest():
            self._seen = digest
            if not self._last_ok:  # reverted to what runs: the file and the gateway agree again
                log.info("route file %s matches the running table again", self.path)
                self._report(True)
            return self._unchanged(reason, digest)
        if digest == self._seen and not force:
            return self._unchanged(reason, digest)
        self._seen = digest

        result = self._load(raw, self.path)  # the same loader as `validate`, off to the side
        table = result.table
        if not result.ok or table is None:
            errors = [f for f in result.findings if f.is_error]
            for finding in errors:
                log.error("%s", finding.format_text(), extra=_extra("invalid", reason))
            log.error("route file %s rejected (%s): %d error(s); still running sha256 %s", self.path,
                      reason, len(errors), self._active_digest()[:12], extra=_extra("invalid", reason))
            self._report(False)
            return ReloadOutcome("invalid", reason, digest, findings=tuple(result.findings))

        started = self._clock()
        old = self._active.swap(table)
        diff = diff_tables(old, table)
        log.info("route file %s reloaded (%s, sha256 %s): %s", self.path, reason,
                 table.digest[:12], diff.describe(), extra=_extra("applied", reason))
        self._report(True)
        if self._on_swap is not None:
            try:
                self._on_swap(old, table, diff)
            except Exception:
                log.exception("route file %s: new table is active but applying it failed "
                              "(subscriptions or flush)", self.path)
        log.debug("reload applied in %.1f ms", (self._clock() - started) * 1000)
        return ReloadOutcome("applied", reason, digest, diff=diff, findings=tuple(result.findings))

    def _unusable(self, reason: str, force: bool, error: RouteFileError) -> ReloadOutcome:
        """A path that cannot be read (retried: a ConfigMap swap may be half done) or that holds no
        route file (a FIFO, a device, a directory, too large: reported once, until it changes)."""
        if not error.fingerprint:
            log.warning("route file %s: %s; keeping the current table and trying again", self.path,
                        error.message, extra=_extra("unreadable", reason))
            self._report(False)
            return ReloadOutcome("unreadable", reason)
        seen = "refused:" + error.fingerprint
        if seen == self._seen and not force:
            return ReloadOutcome("invalid", reason)
        self._seen = seen
        log.error("route file %s refused (%s): %s; still running sha256 %s", self.path, reason, error.message,
                  self._active_digest()[:12], extra=_extra("invalid", reason))
        self._report(False)
        finding = Finding(self.path, 1, 1, "", "unreadable", "error", error.message)
        return ReloadOutcome("invalid", reason, findings=(finding,))

    def _unchanged(self, reason: str, digest: str) -> ReloadOutcome:
        level = logging.INFO if reason == "sighup" else logging.DEBUG
        log.log(level, "route file %s unchanged (sha256 %s, %s)", self.path, digest[:12], reason)
        return ReloadOutcome("unchanged", reason, digest)

    def _report(self, ok: bool) -> None:
        """Metrics always carry the digest of the table in force, which a failure leaves as is."""
        self._last_ok = ok
        if self._metrics is None:
            return
        try:
            self._metrics.reload_result(ok, self._active_digest())
        except Exception:
            log.exception("reload metrics failed")


def _extra(result: str, reason: str) -> dict[str, str]:
    """Fields for JSON logs, so a dashboard can count reloads by result without parsing text."""
    return {"reload_result": result, "reload_reason": reason}
