"""Reload logic with a scripted fake observer and a fake clock: no threads, no sleeps.

The fake observer replays the events watchdog 7 really emits (recorded on Linux) while the test
drives kubelet's atomic writer step by step; the debouncer decides, on fake time, when the one
reload runs. The route files are real YAML read by the real loader.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.routefile.loader import load_routes, load_routes_bytes
from gateway.routefile.reload import ActiveTable, Reloader, TableDiff, diff_tables
from gateway.routefile.watch import Debouncer, DirectoryWatcher, install_sighup, mount_warning
from gateway.routing.expressions import compile_expression
from gateway.routing.table import DeadLetter, Route, RouteTable
from tests.support.atomic_writer import AtomicWriter
from tests.support.nonblocking import finishes_without_blocking

V1 = b"""version: 1
routes:
  - name: welders
    topic: factory/+/welder/#
    stream: welder-telemetry
    partition_key: name
    qos: 1
  - name: presses
    topic: factory/+/press/#
    stream: press-telemetry
    partition_key: name
    qos: 1
"""
# welders changed (key), presses removed, ovens added, a new filter at QoS 0.
V2 = b"""version: 1
routes:
  - name: welders
    topic: factory/+/welder/#
    stream: welder-telemetry
    partition_key: model
    qos: 1
  - name: ovens
    topic: factory/+/oven/#
    stream: oven-telemetry
    partition_key: name
    qos: 0
"""
INVALID = b"""version: 1
routes:
  - name: welders
    topic: factory/+/welder/#
    stream: welder-telemetry
    partition_key: "name("
    qos: 1
  - name: welders
    topic: factory/#/bad
    stream: welder-telemetry
    partition_key: name
    qos: 1
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeObserver:
    """watchdog's Observer surface; the test calls ``emit`` where the OS would report an event."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.handler: Any = None
        self.scheduled: tuple[str, bool] | None = None
        self.running = False

    def schedule(self, handler: Any, path: str, *, recursive: bool = False) -> None:
        if self.fail:
            raise OSError(28, "inotify watch limit reached")
        self.handler, self.scheduled = handler, (path, recursive)

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def join(self, timeout: float | None = None) -> None:
        pass

    def emit(self, event_type: str, name: str, dest: str = "", is_directory: bool = False) -> None:
        assert self.scheduled is not None
        directory = self.scheduled[0]
        self.handler.dispatch(SimpleNamespace(
            event_type=event_type, src_path=os.path.join(directory, name),
            dest_path=os.path.join(directory, dest) if dest else "", is_directory=is_directory))


class Metrics:
    def __init__(self) -> None:
        self.calls: list[tuple[bool, str]] = []

    def reload_result(self, ok: bool, digest: str) -> None:
        self.calls.append((ok, digest))


_WATCHERS: list[DirectoryWatcher] = []


@pytest.fixture(autouse=True)
def _stop_watchers() -> Any:
    yield
    while _WATCHERS:
        _WATCHERS.pop().stop()


class Rig:
    """A ConfigMap-style directory, the reloader on it and a watcher fed by a fake observer."""

    def __init__(self, tmp_path: Path, mode: str = "inotify", content: bytes = V1) -> None:
        self.dir = tmp_path / "config"
        self.writer = AtomicWriter(self.dir)
        self.writer.write({"routes.yaml": content})
        self.path = self.dir / "routes.yaml"
        first = load_routes(self.path)
        assert first.ok, first.findings
        self.active = ActiveTable(first.table)
        self.metrics = Metrics()
        self.swaps: list[tuple[Any, Any, TableDiff]] = []
        self.clock = FakeClock()
        self.reloader = Reloader(self.path, self.active, metrics=self.metrics,
                                 on_swap=lambda old, new, diff: self.swaps.append((old, new, diff)),
                                 clock=self.clock)
        self.observers: list[FakeObserver] = []
        self.watcher = DirectoryWatcher(self.path, self.reloader.reload, mode=mode,  # type: ignore[arg-type]
                                        debounce_s=0.2, rescan_s=30, clock=self.clock,
                                        observer_factory=self._observer)
        self.watcher.start(background=False)
        _WATCHERS.append(self.watcher)

    def _observer(self, mode: str) -> FakeObserver:
        self.observers.append(FakeObserver())
        return self.observers[-1]

    @property
    def observer(self) -> FakeObserver:
        return self.observers[-1]

    def settle(self, seconds: float = 0.25) -> list[str]:
        """Let fake time pass and run whatever became due; the reasons that ran."""
        self.clock.advance(seconds)
        ran = []
        while (reason := self.watcher.run_pending()) is not None:
            ran.append(reason)
        return ran


# What watchdog 7.1 reports for each of kubelet's steps (non-recursive watch on the directory).
INOTIFY_EVENTS = {
    "timestamped-dir-created": [("created", "..ts", "", True), ("modified", ".", "", True),
                                ("attrib", "..ts", "", True)],
    "data-tmp-symlinked": [("created", "..data_tmp", ""), ("modified", ".", "", True)],
    "data-renamed": [("moved", "..data_tmp", "..data"), ("modified", ".", "", True)],
    "old-dir-removed": [("deleted", "..old", "", True), ("modified", ".", "", True)],
}
POLLING_EVENTS = {
    "data-renamed": [("deleted", "routes.yaml", ""), ("created", "routes.yaml", ""),
                     ("deleted", "..data", "", True), ("created", "..data", "", True)],
    "old-dir-removed": [("deleted", "..old", "", True), ("modified", ".", "", True)],
}


@pytest.mark.parametrize("mode,script", [("inotify", INOTIFY_EVENTS), ("polling", POLLING_EVENTS)],
                         ids=["inotify", "polling"])
def test_kubelet_atomic_write_collapses_into_exactly_one_reload(tmp_path: Path, mode: str,
                                                                script: dict) -> None:
    rig = Rig(tmp_path, mode)
    assert rig.observer.scheduled == (str(rig.dir), False)  # the directory, non-recursive
    for step in rig.writer.steps({"routes.yaml": V2}):
        for event in script.get(step, []):
            rig.observer.emit(*event)
        rig.clock.advance(0.001)
        assert rig.watcher.run_pending() is None  # nothing runs inside the burst
    assert rig.settle(0.1) == []
    assert rig.settle(0.2) == ["watch"]
    assert len(rig.swaps) == 1 and rig.active.current.get("ovens") is not None
    assert rig.metrics.calls == [(True, rig.active.current.digest)]
    assert rig.settle(5) == []  # nothing left over


def test_touch_with_unchanged_content_reloads_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    before = rig.active.current
    os.utime(rig.path)                           # what `touch` does; watchdog 7.1 on inotify reports:
    for kind in ("opened", "attrib", "closed"):
        rig.observer.emit(kind, "routes.yaml")
    assert rig.settle() == ["watch"]
    assert rig.active.current is before and rig.swaps == [] and rig.metrics.calls == []


def test_a_route_file_rewritten_in_place_is_not_read_before_its_writer_closed_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.observer.emit("opened", "routes.yaml")
    rig.observer.emit("modified", "routes.yaml")   # truncated; the writer is held up before it writes
    assert rig.settle() == [], "a half-written file must not be read (and rejected)"
    rig.observer.emit("modified", "routes.yaml")
    rig.observer.emit("closed", "routes.yaml")
    assert rig.settle() == ["watch"]


def test_our_own_reads_do_not_trigger_reloads(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.observer.emit("opened", "routes.yaml")
    rig.observer.emit("closed_no_write", "routes.yaml")
    assert rig.settle() == []


def test_valid_change_swaps_and_reports_what_changed(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path)
    old = rig.active.current
    rig.writer.write({"routes.yaml": V2})
    with caplog.at_level(logging.INFO, logger="gateway.routefile.reload"):
        outcome = rig.reloader.reload("watch")
    assert outcome.status == "applied"
    new = rig.active.current
    assert rig.swaps == [(old, new, outcome.diff)]
    assert outcome.diff == TableDiff(
        routes_added=("ovens",), routes_removed=("presses",), routes_changed=("welders",),
        subscriptions_added=(("factory/+/oven/#", 0),),
        subscriptions_removed=(("factory/+/press/#", 1),),
        streams_removed=("press-telemetry",))
    (line,) = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()]
    assert "routes added: ovens" in line and "routes removed: presses" in line
    assert "routes changed: welders" in line and "subscriptions added: factory/+/oven/#" in line
    assert rig.metrics.calls == [(True, new.digest)]


def test_invalid_file_keeps_old_table_and_logs_each_finding_on_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path)
    old = rig.active.current
    rig.writer.write({"routes.yaml": INVALID})
    with caplog.at_level(logging.INFO, logger="gateway.routefile.reload"):
        outcome = rig.reloader.reload("watch")
    assert outcome.status == "invalid" and rig.active.current is old and rig.swaps == []
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    findings = [f for f in outcome.findings if f.is_error]
    assert len(findings) >= 2
    for finding in findings:
        assert finding.format_text() in lines
        assert "\n" not in finding.format_text()
        assert finding.format_text().startswith(f"{rig.path}:{finding.line}:{finding.column}: ")
    assert rig.metrics.calls == [(False, old.digest)]


def test_rejected_file_is_reported_once_but_sighup_revalidates_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.writer.write({"routes.yaml": INVALID})
    assert rig.reloader.reload("watch").status == "invalid"
    assert rig.reloader.reload("rescan").status == "unchanged"
    rig.watcher.request_reload()
    assert rig.settle(0) == ["sighup"]
    assert [ok for ok, _ in rig.metrics.calls] == [False, False]


def test_reverting_a_rejected_file_marks_reload_healthy_and_reapplying_reports_again(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.writer.write({"routes.yaml": INVALID})
    assert rig.reloader.reload("watch").status == "invalid"
    rig.writer.write({"routes.yaml": V1})  # the operator rolls the ConfigMap back
    assert rig.reloader.reload("watch").status == "unchanged"
    rig.writer.write({"routes.yaml": INVALID})  # ... and pushes the bad one again
    assert rig.reloader.reload("watch").status == "invalid"
    assert [ok for ok, _ in rig.metrics.calls] == [False, True, False]


def test_missing_file_mid_swap_keeps_running_and_retries(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    old = rig.active.current
    os.rename(rig.dir / "..data", rig.dir / "..gone")  # the link dangles
    rig.observer.emit("moved", "..data", "..gone")
    assert rig.settle() == ["watch"]
    assert rig.active.current is old
    os.rename(rig.dir / "..gone", rig.dir / "..data")
    rig.writer.write({"routes.yaml": V2})
    assert rig.settle(0.25) == ["retry"]
    assert rig.active.current is not old and len(rig.swaps) == 1


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "100-mb"])
def test_a_route_file_swapped_for_something_else_keeps_the_table_and_later_edits_still_apply(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str) -> None:
    rig = Rig(tmp_path)
    old = rig.active.current
    os.remove(rig.path)
    if kind == "dev-zero":
        rig.path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(rig.path)
    elif kind == "directory":
        rig.path.mkdir()
    else:
        with open(rig.path, "wb") as handle:  # sparse
            handle.truncate(100 * 1024 * 1024)

    def unblock() -> None:
        os.close(os.open(rig.path, os.O_WRONLY | os.O_NONBLOCK))

    with caplog.at_level(logging.INFO, logger="gateway.routefile.reload"):
        outcome = finishes_without_blocking(lambda: rig.reloader.reload("watch"), unblock, "the reload")
        assert rig.reloader.reload("rescan").status == "invalid"  # reported once, not on every rescan
    assert outcome.status == "invalid" and not outcome.retry and rig.active.current is old
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.startswith(f"route file {rig.path} refused (watch): ") and "still running" in line
    assert rig.metrics.calls == [(False, old.digest)]  # config_last_reload_successful 0

    if rig.path.is_dir() and not rig.path.is_symlink():
        rig.path.rmdir()
    else:
        os.remove(rig.path)
    rig.path.symlink_to("..data/routes.yaml")
    rig.writer.write({"routes.yaml": V2})
    assert rig.reloader.reload("watch").status == "applied"
    assert rig.active.current.get("ovens") is not None
    assert rig.metrics.calls == [(False, old.digest), (True, rig.active.current.digest)]


def test_sighup_reports_a_refused_file_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path)
    os.remove(rig.path)
    rig.path.mkdir()
    with caplog.at_level(logging.ERROR, logger="gateway.routefile.reload"):
        assert rig.reloader.reload("watch").status == "invalid"
        assert rig.reloader.reload("sighup").status == "invalid"
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 2


def test_one_read_gives_both_the_digest_and_the_table(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    given: list[bytes] = []

    def load_while_the_file_changes(raw: bytes, filename: str) -> Any:
        given.append(raw)
        rig.writer.write({"routes.yaml": V1})  # the operator reverts while the new file is loading
        return load_routes_bytes(raw, filename)

    reloader = Reloader(rig.path, rig.active, load=load_while_the_file_changes, metrics=rig.metrics)
    rig.writer.write({"routes.yaml": V2})
    outcome = reloader.reload("watch")
    assert given == [V2]
    assert outcome.status == "applied" and outcome.digest == hashlib.sha256(V2).hexdigest()
    assert rig.active.current.digest == outcome.digest and rig.active.current.get("ovens") is not None
    assert reloader.reload("watch").status == "applied"  # the revert is the next change, not lost


def test_loader_crash_never_escapes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path)

    def broken(raw: bytes, filename: str) -> Any:
        raise RuntimeError("boom")

    reloader = Reloader(rig.path, rig.active, load=broken, metrics=rig.metrics)
    rig.writer.write({"routes.yaml": V2})
    assert reloader.reload("watch").status == "error"
    assert rig.metrics.calls == [(False, rig.active.current.digest)]


def test_on_swap_failure_is_logged_and_the_new_table_stays(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(tmp_path)

    def failing(old: Any, new: Any, diff: TableDiff) -> None:
        raise ConnectionError("not connected")

    reloader = Reloader(rig.path, rig.active, on_swap=failing)
    rig.writer.write({"routes.yaml": V2})
    assert reloader.reload("watch").status == "applied"
    assert rig.active.current.get("ovens") is not None
    assert any("applying it failed" in r.getMessage() for r in caplog.records)


def test_sighup_pokes_the_worker_which_reloads(tmp_path: Path) -> None:
    if not hasattr(signal, "SIGHUP"):
        pytest.skip("no SIGHUP on this platform")
    rig = Rig(tmp_path)
    rig.writer.write({"routes.yaml": V2})
    previous = signal.getsignal(signal.SIGHUP)
    try:
        assert install_sighup(rig.watcher)
        signal.raise_signal(signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert rig.swaps == []  # the handler itself did not reload
    assert rig.settle(0) == ["sighup"] and len(rig.swaps) == 1


def test_rescan_backstop_catches_a_missed_event(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.writer.write({"routes.yaml": V2})  # no event emitted: as if it were lost
    assert rig.settle(29) == []
    assert rig.settle(1.5) == ["rescan"] and len(rig.swaps) == 1


def test_inotify_unavailable_falls_back_to_polling(tmp_path: Path) -> None:
    modes: list[str] = []

    def factory(mode: str) -> FakeObserver:
        modes.append(mode)
        return FakeObserver(fail=(mode == "inotify"))

    watcher = DirectoryWatcher(tmp_path / "routes.yaml", lambda reason: None,
                               observer_factory=factory)  # type: ignore[arg-type]
    watcher.start(background=False)
    assert modes == ["inotify", "polling"]
    watcher.stop()


def test_off_mode_watches_nothing_but_sighup_still_works(tmp_path: Path) -> None:
    calls: list[str] = []
    watcher = DirectoryWatcher(tmp_path / "routes.yaml", calls.append, mode="off",
                               observer_factory=lambda mode: pytest.fail("no observer"))
    watcher.start(background=False)
    assert watcher.wait_s() is None
    watcher.request_reload()
    assert watcher.run_pending() == "sighup" and calls == ["sighup"]
    watcher.stop()


def test_debounce_restarts_on_each_event_but_never_waits_past_max_delay() -> None:
    d = Debouncer(debounce_s=0.2, rescan_s=0, now=0.0, max_delay_s=1.0)
    for t in (0.0, 0.15, 0.3, 0.45):
        d.event(t)
        assert d.due(t + 0.1) is None
    assert d.due(0.64) is None and d.due(0.65) == "watch"
    for i in range(20):  # a file that never stops changing
        d.event(1.0 + i * 0.1)
    assert d.due(2.0) == "watch"


def test_a_file_rewritten_in_place_is_read_once_its_writer_closed_it_not_mid_write() -> None:
    d = Debouncer(debounce_s=0.1, rescan_s=0, now=0.0, max_delay_s=1.0)
    d.event(0.0, writing=True)           # truncated, the writer held up before it writes
    assert d.due(0.5) is None, "a half-written file must not be read"
    d.event(0.6, writing=False)          # written and closed
    assert d.due(0.65) is None and d.due(0.7) == "watch"
    d.event(2.0, writing=True)           # a writer that never closes still gets read, late
    assert d.due(2.9) is None and d.due(3.0) == "watch"


def test_retry_backs_off_until_it_succeeds() -> None:
    d = Debouncer(debounce_s=0.2, rescan_s=30, now=0.0)
    delays = []
    now = 0.0
    for _ in range(10):
        d.retry(now)
        wait = d.wait_s(now)
        assert wait is not None
        delays.append(wait)
        now += wait
        assert d.due(now) == "retry"
    assert delays[:4] == pytest.approx([0.2, 0.4, 0.8, 1.6]) and max(delays) == 30
    d.succeeded()
    d.retry(now)
    assert d.wait_s(now) == pytest.approx(0.2)


def _route(name: str, key: str = "name", line: int = 0, **kw: Any) -> Route:
    return Route(name, kw.pop("filters", ("a/#",)), kw.pop("stream", "s"), compile_expression(key),
                 line=line, **kw)


def test_recompiled_or_moved_route_is_not_a_change() -> None:
    old = RouteTable((_route("r", line=3),))
    new = RouteTable((_route("r", line=9),))
    assert diff_tables(old, new).empty


def test_qos_change_and_dead_letter_stream_are_diffed() -> None:
    old = RouteTable((_route("r", qos=0, dead_letter=DeadLetter("kinesis", "dlq")),))
    new = RouteTable((_route("r", qos=1),))
    diff = diff_tables(old, new)
    assert diff.subscriptions_changed == (("a/#", 0, 1),)
    assert diff.routes_changed == ("r",) and diff.streams_removed == ("dlq",)
    assert "subscription qos changed: a/# (0->1)" in diff.describe()


def test_active_table_swap_returns_the_old_table() -> None:
    first, second = RouteTable(()), RouteTable(())
    active = ActiveTable(first)
    held = active.current  # what an in-flight message routed with
    assert active.swap(second) is first and active.current is second and held is first


def test_subpath_mount_is_warned_about(tmp_path: Path) -> None:
    rig_dir = tmp_path / "cm"
    AtomicWriter(rig_dir).write({"routes.yaml": V1})
    assert mount_warning(rig_dir / "routes.yaml") is None
    (rig_dir / "plain.yaml").write_bytes(V1)
    warning = mount_warning(rig_dir / "plain.yaml")
    assert warning is not None and "subPath" in warning
    assert mount_warning(tmp_path / "elsewhere.yaml") is None
