"""Hot reload of the route file: watch its directory, debounce, hash, validate aside, swap.

Only this module swaps the active table. Everything else reads ``ActiveTable.current`` once per
message and keeps that reference until the message is settled, so a message always finishes under
the table that routed it, and a reload never half-applies.

Why the directory and not the file: Kubernetes updates a ConfigMap volume by renaming a
``..data_tmp`` symlink over ``..data``; no event ever names ``routes.yaml`` itself, and an inotify
watch on the file sees nothing. Editors write a temp file and rename it. Watching the directory
catches all of these; the content hash then makes every no-op event (``touch``, our own reads,
unrelated files) cost one read and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway.config.findings import Finding
from gateway.config.loader import LoadResult, load_routes
from gateway.routing.table import RouteTable

__all__ = [
    "ActiveTable", "Debouncer", "DirectoryWatcher", "ReloadOutcome", "Reloader", "TableDiff",
    "diff_tables", "install_sighup", "mount_warning",
]

log = logging.getLogger(__name__)

WatchMode = Literal["inotify", "polling", "off"]
Status = Literal["applied", "unchanged", "invalid", "unreadable", "error"]

#: Event types that never mean "the content may have changed"; our own reads produce them.
_IGNORED_EVENTS = frozenset({"opened", "closed_no_write"})


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
                 load: Callable[[str], LoadResult] = load_routes,
                 on_swap: Callable[[RouteTable, RouteTable, TableDiff], None] | None = None,
                 metrics: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = os.fspath(path)
        self._active = active
        self._load = load
        self._on_swap = on_swap
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        # Digest of the last bytes acted on (applied or rejected): a rejected file is reported
        # once, not again on every touch or backstop rescan.
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
            raw = Path(self.path).read_bytes()  # follows routes.yaml -> ..data/routes.yaml
        except OSError as exc:
            log.warning("route file %s: cannot read it (%s); keeping the current table and "
                        "trying again", self.path, exc.strerror or exc, extra=_extra("unreadable", reason))
            self._report(False)
            return ReloadOutcome("unreadable", reason)
        digest = hashlib.sha256(raw).hexdigest()
        if digest == self._active_digest():
            self._seen = digest
            if not self._last_ok:  # reverted to what runs: the file and the gateway agree again
                log.info("route file %s matches the running table again", self.path)
                self._report(True)
            return self._unchanged(reason, digest)
        if digest == self._seen and not force:
            return self._unchanged(reason, digest)
        self._seen = digest

        result = self._load(self.path)  # the same loader as `validate`, off to the side
        table = result.table
        if not result.ok or table is None:
            errors = [f for f in result.findings if f.is_error]
            for finding in errors:
                log.error("%s", finding.format_text(), extra=_extra("invalid", reason))
            log.error("route file %s rejected (%s): %d error(s); still running sha256 %s", self.path,
                      reason, len(errors), self._active_digest()[:12], extra=_extra("invalid", reason))
            self._report(False)
            return ReloadOutcome("invalid", reason, digest, findings=tuple(result.findings))
        if table.digest == self._active_digest():  # changed back between our read and the loader's
            return self._unchanged(reason, digest)

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


class Debouncer:
    """When to call back, given event times: pure, so tests feed timestamps instead of sleeping.

    Each event pushes the deadline to ``debounce_s`` after it (a burst of events collapses into one
    call), but never past ``max_delay_s`` after the first event of the burst, so a file that keeps
    changing is still picked up. ``rescan_s`` is a backstop for missed or coalesced events.
    """

    def __init__(self, debounce_s: float, rescan_s: float, now: float,
                 max_delay_s: float | None = None) -> None:
        self.debounce_s = debounce_s
        self.rescan_s = rescan_s
        self.max_delay_s = max(1.0, 5 * debounce_s) if max_delay_s is None else max_delay_s
        self._first: float | None = None
        self._deadline: float | None = None
        self._reason = "watch"
        self._retry_delay = 0.0
        self._next_rescan = now + rescan_s if rescan_s > 0 else None

    def event(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._deadline = min(now + self.debounce_s, self._first + self.max_delay_s)
        self._reason = "watch"

    def retry(self, now: float) -> None:
        """Look again later, backing off from ``debounce_s`` up to the rescan interval."""
        cap = self.rescan_s if self.rescan_s > 0 else 30.0
        self._retry_delay = min(max(self._retry_delay * 2, self.debounce_s, 0.05), cap)
        if self._deadline is None:
            self._deadline, self._reason = now + self._retry_delay, "retry"

    def succeeded(self) -> None:
        self._retry_delay = 0.0

    def due(self, now: float) -> str | None:
        """The reason for a call if one is due now ("watch", "retry", "rescan"), else None."""
        if self._deadline is not None and now >= self._deadline:
            reason = self._reason
            self._first = self._deadline = None
        elif self._next_rescan is not None and now >= self._next_rescan:
            reason = "rescan"
        else:
            return None
        if self._next_rescan is not None:
            self._next_rescan = now + self.rescan_s
        return reason

    def wait_s(self, now: float) -> float | None:
        """Seconds until something may be due; None means nothing is scheduled."""
        times = [t for t in (self._deadline, self._next_rescan) if t is not None]
        return max(0.0, min(times) - now) if times else None


class DirectoryWatcher:
    """Calls ``on_change(reason)`` on one worker thread when the route file's directory changes.

    ``mode``: "inotify" (watchdog's native observer, falling back to polling when inotify is not
    available), "polling" (filesystems without inotify: NFS, some overlay and FUSE mounts) or "off"
    (no watching; SIGHUP still works). The callback never runs concurrently with itself. If it
    returns an object whose ``retry`` is true, the watcher looks again after a growing delay.
    """

    def __init__(self, path: str | os.PathLike[str], on_change: Callable[[str], Any], *,
                 mode: WatchMode = "inotify", debounce_s: float = 0.2, rescan_s: float = 30.0,
                 poll_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 observer_factory: Callable[[WatchMode], Any] | None = None) -> None:
        if mode not in ("inotify", "polling", "off"):
            raise ValueError(f"reload mode must be inotify, polling or off, not {mode!r}")
        self.path = os.fspath(path)
        self.directory = os.path.dirname(os.path.abspath(self.path))
        self.mode: WatchMode = mode
        self.poll_interval_s = poll_interval_s
        self._on_change = on_change
        self._clock = clock
        self._observer_factory = observer_factory or self._watchdog_observer
        self._lock = threading.Lock()
        self._debouncer = Debouncer(debounce_s, rescan_s if mode != "off" else 0, clock())
        self._hup_requested = 0  # written only by the signal handler (main thread)
        self._hup_handled = 0
        self._stopping = False
        self._observer: Any = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- events in -------------------------------------------------------------------------
    def dispatch(self, event: Any) -> None:
        """Called by the observer thread for every event in the directory."""
        if getattr(event, "event_type", None) in _IGNORED_EVENTS:
            return
        with self._lock:
            self._debouncer.event(self._clock())
        self._wake()

    def request_reload(self) -> None:
        """Ask for a reload now. Safe inside a signal handler: no lock, one write to a pipe."""
        self._hup_requested += 1
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass  # the pipe is full (a wake-up is pending anyway) or closed (stopped)

    # -- the worker ------------------------------------------------------------------------
    def run_pending(self) -> str | None:
        """Run the callback once if something is due; returns the reason, or None."""
        if self._hup_requested != self._hup_handled:
            self._hup_handled = self._hup_requested
            reason: str | None = "sighup"
        else:
            with self._lock:
                reason = self._debouncer.due(self._clock())
        if reason is None:
            return None
        try:
            outcome = self._on_change(reason)
        except Exception:
            log.exception("route file %s: reload callback failed", self.path)
            outcome = None
        with self._lock:
            if getattr(outcome, "retry", False):
                self._debouncer.retry(self._clock())
            else:
                self._debouncer.succeeded()
        return reason

    def wait_s(self) -> float | None:
        with self._lock:
            return self._debouncer.wait_s(self._clock())

    def _run(self) -> None:
        while not self._stopping:
            select.select([self._wake_r], [], [], self.wait_s())
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            if not self._stopping:
                while self.run_pending() is not None:
                    pass

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, *, background: bool = True) -> None:
        """Start watching. ``background=False`` leaves ``run_pending`` to the caller (tests)."""
        if self.mode != "off":
            self._observer = self._schedule(self.mode)
        if background:
            self._thread = threading.Thread(target=self._run, name="route-reload", daemon=True)
            self._thread.start()

    def _schedule(self, mode: WatchMode) -> Any:
        handler = _Handler(self.dispatch)
        try:
            observer = self._observer_factory(mode)
            observer.schedule(handler, self.directory, recursive=False)
            observer.start()
        except OSError as exc:
            if mode == "inotify":
                log.warning("route file %s: inotify unavailable (%s); polling every %.1f s",
                            self.path, exc, self.poll_interval_s)
                return self._schedule("polling")
            log.error("route file %s: cannot watch %s (%s); relying on the %.0f s rescan",
                      self.path, self.directory, exc, self._debouncer.rescan_s)
            return None
        log.info("watching %s for route changes (%s)", self.directory, mode)
        return observer

    def _watchdog_observer(self, mode: WatchMode) -> Any:
        if mode == "polling":
            from watchdog.observers.polling import PollingObserver
            return PollingObserver(timeout=self.poll_interval_s)
        from watchdog.observers import Observer
        return Observer()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout_s)
            self._observer = None
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if not self._thread.is_alive():
                self._thread = None
        if self._thread is None and self._wake_r >= 0:  # never close a descriptor twice
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1


class _Handler:
    """The watchdog handler protocol (``dispatch``) without importing watchdog at module load."""

    def __init__(self, sink: Callable[[Any], None]) -> None:
        self.dispatch = sink


def install_sighup(watcher: DirectoryWatcher) -> bool:
    """Make SIGHUP reload the route file on the watcher's worker. Call from the main thread.

    The handler only pokes the worker: a reload takes locks and does I/O, which a signal handler
    interrupting arbitrary code must not. Returns False where there is no SIGHUP (Windows).
    """
    if not hasattr(signal, "SIGHUP"):
        return False
    signal.signal(signal.SIGHUP, lambda _signum, _frame: watcher.request_reload())
    return True


def mount_warning(path: str | os.PathLike[str]) -> str | None:
    """A warning when the route file sits in a ConfigMap volume but will never see an update.

    A ConfigMap mounted as a directory shows ``name -> ..data/name`` symlinks next to ``..data``;
    a regular file beside ``..data`` (or a lone file from a ``subPath`` mount, which we cannot tell
    apart from a plain file) is pinned to the inode it was mounted with.
    """
    file = os.fspath(path)
    data = os.path.join(os.path.dirname(os.path.abspath(file)), "..data")
    if os.path.lexists(data) and not os.path.islink(file):
        return (f"route file {file} is not a symlink into ..data: a Kubernetes subPath mount "
                f"never updates; mount the ConfigMap as a directory to get hot reload")
    return None
