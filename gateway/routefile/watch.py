"""Watching the route file's directory: debounce, backstop rescans, polling fallback, SIGHUP.

Why the directory and not the file: Kubernetes updates a ConfigMap volume by renaming a
``..data_tmp`` symlink over ``..data``; no event ever names ``routes.yaml`` itself, and an inotify
watch on the file sees nothing. Editors write a temp file and rename it. Watching the directory
catches all of these; the reloader's content hash then makes every no-op event (``touch``, our own
reads, unrelated files) cost one read and nothing else. The timing logic (``Debouncer``) is pure,
so it is tested with a scripted clock and no sleeps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["Debouncer", "DirectoryWatcher", "WatchMode", "install_sighup", "mount_warning"]

log = logging.getLogger(__name__)

WatchMode = Literal["inotify", "polling", "off"]

#: Event types that never mean "the content may have changed"; our own reads produce them.
_IGNORED_EVENTS = frozenset({"opened", "closed_no_write"})


class Debouncer:
    """When to call back, given event times: pure, so tests feed timestamps instead of sleeping.

    Each event pushes the deadline to ``debounce_s`` after it (a burst of events collapses into one
    call), but never past ``max_delay_s`` after the first event of the burst, so a file that keeps
    changing is still picked up. ``rescan_s`` is a backstop for missed or coalesced events. While a
    writer has the route file open (rewritten in place: modified, not yet closed) the call waits
    for the close, up to ``max_delay_s``: a writer held up between truncating and writing must not
    get its half-written file read and rejected.
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
        self._writing = False

    def event(self, now: float, writing: bool | None = None) -> None:
        """An event at ``now``; ``writing`` True: the route file was modified in place and is
        still open, False: its writer closed it, None: anything else."""
        if self._first is None:
            self._first = now
        if writing is not None:
            self._writing = writing
        last = self._first + self.max_delay_s
        self._deadline = last if self._writing else min(now + self.debounce_s, last)
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
            self._writing = False
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
        self._abspath = os.path.abspath(self.path)
        self.directory = os.path.dirname(self._abspath)
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
        self._closes_reported = False   # inotify reports a writer's close; polling does not
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- events in -------------------------------------------------------------------------
    def dispatch(self, event: Any) -> None:
        """Called by the observer thread for every event in the directory."""
        kind = getattr(event, "event_type", None)
        if kind in _IGNORED_EVENTS:
            return
        writing = None
        if self._closes_reported and kind in ("modified", "closed") and self._is_route_file(event):
            writing = kind == "modified"
        with self._lock:
            self._debouncer.event(self._clock(), writing)
        self._wake()

    def _is_route_file(self, event: Any) -> bool:
        path = getattr(event, "src_path", None)
        return isinstance(path, str) and os.path.abspath(path) == self._abspath

    def request_reload(self) -> None:
        """Ask for a reload now. Safe inside a signal handler: no lock, one write to a pipe."""
        self._hup_requested += 1
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # the pipe is full (a wake-up is pending anyway) or closed
            os.write(self._wake_w, b"!")

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

    @property
    def stopping(self) -> bool:
        return self._stopping

    def wait_s(self) -> float | None:
        with self._lock:
            return self._debouncer.wait_s(self._clock())

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:  # not select.select: fds past 1024 must work
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                selector.select(self.wait_s())
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                if self.stopping:  # set by stop() on another thread while we waited
                    break
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
        self._closes_reported = mode == "inotify"
        log.info("watching %s for route changes (%s)", self.directory, mode)
        return observer

    def _watchdog_observer(self, mode: WatchMode) -> Any:
        if mode == "polling":
            from watchdog.observers.polling import PollingObserver  # noqa: PLC0415 - only in this mode
            return PollingObserver(timeout=self.poll_interval_s)
        from watchdog.observers import Observer  # noqa: PLC0415 - inotify only when watching
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
