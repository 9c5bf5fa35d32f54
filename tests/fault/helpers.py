"""Fault-suite plumbing shared by the test modules: seed, scale switch, rig.

Why a seed: the kill points and partial-failure draws are random so that repeated CI runs cover
different instants, yet a failing run must be replayable. The seed comes from FAULT_SEED or the
clock, and is printed in the pytest header, at the start of every test and in every report line.

Why two scales: the long variants (50k messages, 5-minute outages, 2-minute throttling) take
longer than CI can spend. FAULT_FULL=1 selects them; the default keeps the same
pass criteria with shorter durations, so a regression shows in CI and the long run only adds
confidence.

The fixtures' moto server serialises each shard's writes (moto 5.2.5 numbers records
max(existing)+1 without a lock and loses some under concurrent PutRecords; see
tests/support/services.py), so the oracle can trust what it reads back.

This is a plain module (not the conftest) so that test modules import one instance of it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.support.faultproxy import FaultProxy
from tests.support.gatewayproc import GatewayProcess
from tests.support.publisher import Publisher
from tests.support.services import read_all

FULL = os.environ.get("FAULT_FULL", "").strip().lower() in ("1", "true", "yes")
TOPIC = "fault/welder/1"


def scale(ci: float, full: float) -> float:
    """The CI value, or the long variant's value when FAULT_FULL=1."""
    return full if FULL else ci


def _session_seed() -> int:
    raw = os.environ.get("FAULT_SEED", "").strip()
    return int(raw) if raw else int(time.time() * 1000) % 1_000_000_007


SEED = _session_seed()


def rss_mb(pid: int | None) -> float:
    return psutil.Process(pid).memory_info().rss / 1e6 if pid else 0.0


def threads_of(pid: int | None) -> int:
    return psutil.Process(pid).num_threads() if pid else 0


def log_messages(gw: GatewayProcess) -> list[str]:
    return [str(e.get("message", e.get("msg", e.get("raw", "")))) for e in gw.logs()]


def routes_yaml(stream: str, topic: str = "fault/#", key: str = "name") -> str:
    return (f"version: 1\nroutes:\n  - name: fault\n    topic: \"{topic}\"\n    stream: {stream}\n"
            f"    qos: 1\n    partition_key: {key}\n")


# Fast reconnects and short retry caps keep CI durations down; the behaviour under test is the same.
BASE_ENV = {"MQTT_KEEPALIVE_S": "10", "MQTT_RECONNECT_MIN_S": "0.2", "MQTT_RECONNECT_MAX_S": "2",
            "KINESIS_RETRY_CAP_MS": "2000", "GATEWAY_SHUTDOWN_TIMEOUT_S": "10", "LOG_LEVEL": "INFO"}


@dataclass
class Rig:
    """What one scenario needs: a stream, its route file, the proxy, gateway(s), publishers."""

    stream: str
    routes: Path
    kinesis: Any
    proxy: FaultProxy
    start_gateway: Callable[..., GatewayProcess]
    make_publisher: Callable[..., Publisher]
    name: str
    started: float = field(default_factory=time.monotonic)

    def gateway(self, **kw: Any) -> GatewayProcess:
        """A started, ready gateway on the proxy (GatewayProcess kwargs; extra_env merged)."""
        kw["extra_env"] = {**BASE_ENV, **(kw.get("extra_env") or {})}
        kw.setdefault("kinesis_url", self.proxy.url)
        return self.start_gateway(self.routes, **kw)

    def publisher(self, **kw: Any) -> Publisher:
        kw.setdefault("topic", TOPIC)
        return self.make_publisher(**kw)

    def records(self) -> list[dict[str, Any]]:
        return read_all(self.kinesis, self.stream)

    def wait_delivered(self, acked: set[int], timeout: float = 120.0,
                       poll_s: float = 1.0) -> list[dict[str, Any]]:
        """Poll Kinesis until every acked seq is there (or the timeout); returns the records."""
        deadline = time.monotonic() + timeout
        while True:
            if acked <= self.proxy.written_seqs() or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        return self.records()
