"""Hot reload against real watchdog observers on a temporary directory (no broker, no Kinesis).

Every way a route file changes in the field: kubelet's atomic writer (ConfigMap volume), an
editor's write-temp-then-rename, an in-place write. Each must give exactly one reload within 2 s,
with inotify and with polling; a touch with unchanged content must give none.

The last test runs the real gateway (with Mosquitto and moto) and swaps its route file for a FIFO
and for a symlink to /dev/zero: the reload thread must neither block nor read without end, and
must keep applying later edits (docs/route-file.md#limits).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.routefile.loader import load_routes
from gateway.routefile.reload import ActiveTable, Reloader, ReloadOutcome
from gateway.routefile.watch import DirectoryWatcher
from tests.support.atomic_writer import AtomicWriter
from tests.support.gatewayproc import GatewayProcess

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


# -- the live gateway: a route file swapped for a FIFO or /dev/zero --------------------------------


def _config(gw: GatewayProcess) -> tuple[float, str, float]:
    """(config_last_reload_successful, config_info sha256, failed reloads)."""
    ok, sha, failed = -1.0, "", 0.0
    for fam in gw.metrics():
        for sample in fam.samples:
            if sample.name == "mqtt_kinesis_gateway_config_last_reload_successful":
                ok = sample.value
            elif sample.name == "mqtt_kinesis_gateway_config_info":
                sha = sample.labels.get("sha256", "")
            elif sample.name == "mqtt_kinesis_gateway_config_reloads_total":
                failed = sample.value if sample.labels.get("result") == "failure" else failed
    return ok, sha, failed


def _wait_config(gw: GatewayProcess, want: Callable[[tuple[float, str, float]], bool], timeout_s: float = 10.0
                 ) -> tuple[float, str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = _config(gw)
        if want(got):
            return got
        assert time.monotonic() < deadline, f"config metrics stayed {got}"
        assert gw.alive, gw.output_tail()
        time.sleep(0.05)


def _refusals(gw: GatewayProcess, path: Path) -> list[str]:
    return [e["message"] for e in gw.logs() if e.get("message", "").startswith(f"route file {path} refused")]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _swap_in(path: Path, make: Callable[[Path], None]) -> None:
    """Replace ``path`` in one rename, as an editor or a deploy tool would."""
    temp = path.with_name(".routes.yaml.new")
    make(temp)
    os.replace(temp, path)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_live_gateway_refuses_a_fifo_and_dev_zero_once_each_and_keeps_reloading(
        tmp_path: Path, kinesis_stream: str, gateway_process: Callable[..., GatewayProcess]) -> None:
    route = ROUTE.replace("{name}-telemetry", kinesis_stream)
    valid = [("version: 1\nroutes:\n" + "".join(route.format(name=n) for n in names)).encode()
             for names in (("welder",), ("welder", "press"))]
    config = tmp_path / "config"
    config.mkdir()
    path = config / "routes.yaml"
    path.write_bytes(valid[0])
    gw = gateway_process(path, extra_env={"GATEWAY_RELOAD_RESCAN_S": "0.5", "GATEWAY_RELOAD_DEBOUNCE_MS": "100"})
    assert gw.pid is not None
    _wait_config(gw, lambda c: c[0] == 1 and c[1] == hashlib.sha256(valid[0]).hexdigest())

    _swap_in(path, os.mkfifo)  # used to block the reload thread for good in open()
    _wait_config(gw, lambda c: c[0] == 0 and c[2] == 1)
    time.sleep(1.5)  # three backstop rescans: a refused file is reported once, not on every look
    assert _config(gw)[2] == 1
    (line,) = _refusals(gw, path)
    assert "a FIFO (named pipe), not a regular file" in line

    gw.signal(signal.SIGHUP)  # the reload thread is alive: an operator's SIGHUP gets an answer
    _wait_config(gw, lambda c: c[2] == 2)
    assert len(_refusals(gw, path)) == 2

    _swap_in(path, lambda temp: temp.symlink_to("/dev/zero"))  # used to read until memory ran out
    _wait_config(gw, lambda c: c[0] == 0 and c[2] == 3)
    assert "a character device, not a regular file" in _refusals(gw, path)[-1]
    assert _rss_mb(gw.pid) < 400

    _swap_in(path, lambda temp: temp.write_bytes(valid[1]))
    _, sha, failed = _wait_config(gw, lambda c: c[0] == 1)
    assert (sha, failed) == (hashlib.sha256(valid[1]).hexdigest(), 3)
    assert gw.alive
