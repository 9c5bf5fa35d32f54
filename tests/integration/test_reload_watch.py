"""Hot reload against real watchdog observers on a temporary directory (no broker, no Kinesis).

Every way a route file changes in the field: kubelet's atomic writer (ConfigMap volume), an
editor's write-temp-then-rename, an in-place write. Each must give exactly one reload within 2 s,
with inotify and with polling; a touch with unchanged content must give none.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.routefile.loader import load_routes
from gateway.routefile.reload import ActiveTable, ReloadOutcome, Reloader
from gateway.routefile.watch import DirectoryWatcher
from tests.support.atomic_writer import AtomicWriter

pytestmark = pytest.mark.timeout(30)

ROUTE = """  - name: {name}
    topic: factory/+/{name}/#
    stream: {name}-telemetry
    partition_key: name
    qos: 1
"""


def routes(*names: str) -> bytes:
    return ("version: 1\nroutes:\n" + "".join(ROUTE.format(name=n) for n in names)).encode()


V1, V2 = routes("welder"), routes("welder", "press")
INVALID = b"version: 1\nroutes:\n  - name: welder\n    topic: a/#/b\n"
QUIET_S = 1.0  # well past the 0.2 s debounce and several 0.1 s polling passes


class Recorder:
    """Wraps the reloader so the test can wait for outcomes instead of sleeping blindly."""

    def __init__(self, reloader: Reloader) -> None:
        self.reloader = reloader
        self.outcomes: list[ReloadOutcome] = []
        self.changed = threading.Condition()

    def __call__(self, reason: str) -> ReloadOutcome:
        outcome = self.reloader.reload(reason)
        with self.changed:
            self.outcomes.append(outcome)
            self.changed.notify_all()
        return outcome

    def statuses(self) -> list[str]:
        return [o.status for o in self.outcomes if o.status != "unchanged"]

    def wait_for(self, status: str, timeout_s: float) -> float:
        """Seconds until an outcome with ``status`` arrived; fails after ``timeout_s``."""
        start = time.monotonic()
        with self.changed:
            ok = self.changed.wait_for(lambda: status in self.statuses(), timeout_s)
        assert ok, f"no {status} reload within {timeout_s} s: {self.outcomes}"
        return time.monotonic() - start

    def wait_for_any(self, timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: bool(self.outcomes), timeout_s)


class Rig:
    def __init__(self, directory: Path, path: Path, mode: str) -> None:
        self.dir, self.path = directory, path
        first = load_routes(path)
        assert first.ok, first.findings
        self.active = ActiveTable(first.table)
        self.recorder = Recorder(Reloader(path, self.active))
        # A long rescan so every reload here is the watcher's doing, not the backstop's.
        self.watcher = DirectoryWatcher(path, self.recorder, mode=mode,  # type: ignore[arg-type]
                                        debounce_s=0.2, rescan_s=3600, poll_interval_s=0.1)
        self.watcher.start()

    def quiet(self) -> None:
        time.sleep(QUIET_S)


@pytest.fixture(params=["inotify", "polling"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def configmap(tmp_path: Path, mode: str) -> Iterator[tuple[Rig, AtomicWriter]]:
    writer = AtomicWriter(tmp_path / "config")
    writer.write({"routes.yaml": V1})
    rig = Rig(writer.target, writer.target / "routes.yaml", mode)
    yield rig, writer
    rig.watcher.stop()


@pytest.fixture
def plain(tmp_path: Path, mode: str) -> Iterator[Rig]:
    path = tmp_path / "routes.yaml"
    path.write_bytes(V1)
    rig = Rig(tmp_path, path, mode)
    yield rig
    rig.watcher.stop()


def test_kubelet_atomic_write_reloads_once_within_2s(configmap: tuple[Rig, AtomicWriter]) -> None:
    rig, writer = configmap
    assert writer.write({"routes.yaml": V2})
    assert rig.recorder.wait_for("applied", 2.0) < 2.0
    rig.quiet()
    assert rig.recorder.statuses() == ["applied"]
    assert rig.active.current.get("press") is not None
    assert os.readlink(rig.dir / "routes.yaml") == "..data/routes.yaml"


def test_invalid_configmap_update_keeps_the_old_table(configmap: tuple[Rig, AtomicWriter]) -> None:
    rig, writer = configmap
    old = rig.active.current
    writer.write({"routes.yaml": INVALID})
    rig.recorder.wait_for("invalid", 2.0)
    rig.quiet()
    assert rig.recorder.statuses() == ["invalid"] and rig.active.current is old


def test_touch_of_configmap_file_reloads_nothing(configmap: tuple[Rig, AtomicWriter]) -> None:
    rig, writer = configmap
    os.utime(rig.path)  # follows the symlink, as touch(1) does
    assert not writer.write({"routes.yaml": V1})  # the kubelet skips an unchanged payload
    rig.quiet()
    assert rig.recorder.statuses() == []


def test_touch_of_plain_file_is_seen_and_ignored(plain: Rig) -> None:
    before = plain.active.current
    os.utime(plain.path)
    assert plain.recorder.wait_for_any(2.0)  # the event did arrive ...
    plain.quiet()
    assert plain.recorder.statuses() == [] and plain.active.current is before  # ... and was a no-op


def test_editor_write_temp_then_rename_reloads_once(plain: Rig) -> None:
    temp = plain.dir / ".routes.yaml.swp"
    temp.write_bytes(V2)
    os.replace(temp, plain.path)
    assert plain.recorder.wait_for("applied", 2.0) < 2.0
    plain.quiet()
    assert plain.recorder.statuses() == ["applied"]


def test_in_place_write_reloads_once(plain: Rig) -> None:
    with open(plain.path, "wb") as handle:
        handle.write(V2)
    assert plain.recorder.wait_for("applied", 2.0) < 2.0
    plain.quiet()
    assert plain.recorder.statuses() == ["applied"]
