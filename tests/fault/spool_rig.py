"""What the spool's acceptance tests share: stock-limit Mosquitto, a real HTTP Kinesis endpoint
behind a TCP proxy, a spool directory, and one-line measurements.

Why these parts: the spool exists because a broker's queue is small (stock Mosquitto keeps 1,000
messages per client, then drops new ones without telling the publisher), so the broker here runs
with `max_queued_messages 1000`; a larger queue would hide a gateway that stopped acknowledging.
Kinesis is the bench endpoint (bench/endpoint.py: real HTTP, botocore speaks to it, it reads back
every record and can throttle per shard like Kinesis). Between them a TCP proxy (tests/support/
tcpproxy.py) makes Kinesis unreachable on command: `cut()` resets every connection and refuses
new ones, `heal()` listens again, which is what a lost uplink looks like to the gateway.

The oracle is the fault suite's: every seq the broker PUBACKed to the publisher must be in Kinesis
(tests/support/oracle.py); duplicates are counted and printed.

A plain module (not the conftest) so that the test modules import one instance of it.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.services import Endpoint
from tests.fault.helpers import BASE_ENV, rss_mb
from tests.support.gatewayproc import GatewayProcess
from tests.support.oracle import check_delivery, seqs_in, wait_until
from tests.support.publisher import Publisher
from tests.support.services import Mosquitto
from tests.support.tcpproxy import TcpProxy

STOCK_QUEUE = 1000        # Mosquitto's default max_queued_messages
TOPIC = "spool/welder/1"
STREAM = "spool-stream"


def routes_yaml(stream: str = STREAM, *, qos: int = 1, key: str = "seq") -> str:
    """One route; the partition key is the seq, so records spread evenly over the shards."""
    return (f"version: 1\nroutes:\n  - name: spooled\n    topic: \"spool/#\"\n    stream: {stream}\n"
            f"    qos: {qos}\n    partition_key: {key}\n")


@dataclass
class SpoolRig:
    """A broker with the stock queue, the endpoint, the proxy to it, and the gateway's spool dir."""

    broker: Mosquitto
    endpoint: Endpoint
    proxy: TcpProxy
    spool_dir: Path
    routes: Path
    start_gateway: Callable[..., GatewayProcess]
    make_publisher: Callable[..., Publisher]
    stream: str = STREAM
    gateways: list[GatewayProcess] = field(default_factory=list)

    @property
    def kinesis_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    def gateway_env(self, **extra: str) -> dict[str, str]:
        return {**BASE_ENV, "GATEWAY_SPOOL_DIR": str(self.spool_dir), "GATEWAY_RELOAD": "off", **extra}

    def gateway(self, *, ready: bool = True, **env: str) -> GatewayProcess:
        """A started gateway spooling to `spool_dir`, Kinesis through the proxy; ready unless told."""
        gw = self.start_gateway(self.routes, mqtt_port=self.broker.port, kinesis_url=self.kinesis_url,
                                extra_env=self.gateway_env(**env), ready=ready)
        self.gateways.append(gw)
        if not ready:
            wait_alive(gw)
        return gw

    def publisher(self, **kw: Any) -> Publisher:
        kw.setdefault("topic", TOPIC)
        return self.make_publisher(port=self.broker.port, **kw)

    def records(self) -> list[bytes]:
        return [base64.b64decode(r[2]) for r in self.endpoint.records(self.stream)]

    def delivered_seqs(self) -> set[int]:
        return {s for data in self.records() for s in seqs_in(data)}

    def wait_delivered(self, acked: set[int], timeout: float) -> list[bytes]:
        wait_until(lambda: acked <= self.delivered_seqs(), timeout, poll_s=0.5)
        return self.records()


def publish_until(pub: Publisher, stop: threading.Event, first: int = 0, rate: float = 200.0) -> threading.Thread:
    """Publish seqs first, first+1, ... at `rate` on a daemon thread until `stop` is set."""
    seqs = itertools.takewhile(lambda _: not stop.is_set(), itertools.count(first))
    return pub.publish_in_background(seqs, rate=rate)


def wait_alive(gw: GatewayProcess, timeout: float = 30.0) -> None:
    """Until /healthz answers 200 (readiness may rightly be 503 during an outage)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not gw.alive:
            raise RuntimeError(f"gateway exited with {gw.returncode}\n{gw.output_tail()}")
        if gw.http_get("/healthz")[0] == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(f"gateway not alive after {timeout}s\n{gw.output_tail()}")


def readiness(gw: GatewayProcess) -> tuple[int, dict[str, Any]]:
    status, body = gw.http_get("/readyz")
    try:
        return status, json.loads(body) if body else {}
    except ValueError:
        return status, {"raw": body}


def spool_problem(gw: GatewayProcess) -> str | None:
    """The readiness problem naming the spool, if /readyz says 503 because of it."""
    status, body = readiness(gw)
    problems = body.get("problems") or {}
    text = next((str(v) for k, v in problems.items() if "spool" in str(k)), None)
    return text if status == 503 else None


class RssSampler:
    """The gateway's RSS once a second on a background thread; `growth_mb` = max - first."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append(rss_mb(self.gw.pid))
            self._stop.wait(1.0)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth_mb(self) -> float:
        return max(self.samples) - self.samples[0] if self.samples else 0.0


def deliveries(rig: SpoolRig, acked: set[int], sent: int) -> Any:
    return check_delivery(acked, rig.records(), sent=sent)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` for the block (the tests run as root); unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def fill(path: Path) -> int:
    """Write to `path` until the file system is full; returns the bytes written."""
    chunk = b"\0" * 65536
    written = 0
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                written += fh.write(chunk)
            except OSError:
                break
        with contextlib.suppress(OSError):
            while fh.write(b"\0" * 512):
                written += 512
    return written
