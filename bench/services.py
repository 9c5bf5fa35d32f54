"""Local Mosquitto and the bench Kinesis endpoint as subprocesses, started and stopped by pid.

Mosquitto's limits are written into the generated config on purpose and reported with the
results: with the stock `max_queued_messages 1000` a 100k burst loses 19–47 % of its messages at
the broker before any subscriber can act (docs/performance.md#what-it-compares), which would make every subject look
lossy. `max_inflight_messages` is the QoS 1 window for 3.1.1 clients; v5 clients bring their own
Receive Maximum, which Mosquitto uses instead (docs/delivery.md#backpressure).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

HOST = "127.0.0.1"
MOSQUITTO_BIN = os.environ.get("BENCH_MOSQUITTO", "mosquitto")
MOSQUITTO_LIMITS = {
    "max_queued_messages": 1_000_000,
    "max_queued_bytes": 0,
    "max_inflight_messages": 1000,
    "max_inflight_bytes": 0,
    "queue_qos0_messages": "false",
    "persistence": "false",
    "set_tcp_nodelay": "true",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 15.0) -> int | None:
    """SIGTERM this one process, wait, SIGKILL if it ignores us."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        except ProcessLookupError:
            pass
    return proc.wait(timeout=timeout)


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout} s")


@dataclass
class Mosquitto:
    """One broker on a free port with the bench limits; a fresh one per measured run."""

    workdir: Path
    port: int = 0
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def start(self) -> Mosquitto:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.log = self.workdir / f"mosquitto-{self.port}.log"
        lines = [f"listener {self.port} {HOST}", "allow_anonymous true",
                 f"log_dest file {self.log}", "log_type error", "log_type warning",
                 "log_type notice", "log_type information", "connection_messages true"]
        lines += [f"{k} {v}" for k, v in MOSQUITTO_LIMITS.items()] + self.extra
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.append("user root")  # otherwise 2.0 drops to `mosquitto`, which cannot write the log
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)
        return self

    def dropped_lines(self) -> int:
        """Log lines in which Mosquitto admits to dropping messages (its only trace of a drop)."""
        try:
            text = self.log.read_text(errors="replace")
            return sum("dropped" in line.lower() for line in text.splitlines())
        except OSError:
            return 0

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


def mosquitto_version() -> str:
    try:
        out = subprocess.run([MOSQUITTO_BIN, "-h"], capture_output=True, text=True, timeout=5).stdout
    except OSError as exc:
        return f"unavailable ({exc})"
    return out.splitlines()[0].strip() if out else "unknown"


class Endpoint:
    """The bench Kinesis endpoint (bench/endpoint.py) plus a tiny client for its read-back API."""

    def __init__(self, streams: list[str], workdir: Path, *, shards: int = 1, throttle: bool = False) -> None:
        self.streams = streams
        self.workdir = workdir
        self.shards = shards
        self.throttle = throttle
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Endpoint:
        args = [sys.executable, "-m", "bench.endpoint", "--port", "0"]
        for s in self.streams:
            args += ["--stream", s]
        args += ["--shards", str(self.shards)] + (["--throttle"] if self.throttle else [])
        root = Path(__file__).resolve().parents[1]
        log = open(self.workdir / "endpoint.log", "wb")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, cwd=root,
                                     env={**os.environ, "PYTHONPATH": str(root)})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench endpoint did not start; see {self.workdir / 'endpoint.log'}")
        self.port = int(orjson.loads(line)["port"])
        return self

    def _get(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=30) as resp:
            return orjson.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._get("/_stats")

    def count(self, stream: str) -> int:
        return int(self.stats()["streams"].get(stream, 0))

    def reset(self) -> None:
        self._get("/_reset", "POST")

    def throttle_stats(self, stream: str) -> dict[str, int]:
        """sent / accepted / throttled entries (and shards) of a throttled stream since it was throttled."""
        return dict(self.stats()["throttle"][stream])

    def set_throttle(self, stream: str, on: bool = True) -> None:
        """Throttle `stream` like Kinesis from now on (fresh counters, full buckets), or stop."""
        self._get(f"/_throttle?stream={stream}&on={int(on)}", "POST")

    def records(self, stream: str, start: int = 0) -> list[list[Any]]:
        """Every record held for `stream` from index `start`: [recv_ns, partition_key, data_b64]."""
        out: list[list[Any]] = []
        while True:
            page = self._get(f"/_records?stream={stream}&start={start}&limit=50000")
            out.extend(page["records"])
            start = page["next"]
            if start >= page["total"] or not page["records"]:
                return out

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None
