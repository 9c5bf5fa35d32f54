"""Fixtures of the fault suite: the per-test rng from the session seed, the rig and the report.

Every test ends with one DeliveryReport line (printed, and appended with the test name to the
file named by GATEWAY_TEST_REPORT), so a run can be quoted without re-reading its output. The
plumbing itself (seed, scale switch, serialising proxy) lives in tests/fault/helpers.py.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fault.helpers import FULL, SEED, Rig, routes_yaml
from tests.fault.spool_rig import STOCK_QUEUE, STREAM, SpoolRig
from tests.fault.spool_rig import routes_yaml as spool_routes
from tests.support.faultproxy import FaultProxy
from tests.support.gatewayproc import GatewayProcess
from tests.support.oracle import DeliveryReport, check_delivery
from tests.support.publisher import Publisher
from tests.support.services import MotoServer


def pytest_report_header(config: pytest.Config) -> str:
    return (f"fault suite: FAULT_SEED={SEED} ({'FAULT_FULL=1 long variants' if FULL else 'CI scale'})")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A Random derived from the session seed and the test name: replayable per test."""
    print(f"\n[fault] FAULT_SEED={SEED} test={request.node.name}")
    return random.Random(f"{SEED}:{request.node.name}")


@pytest.fixture
def fault_proxy(kinesis_endpoint: MotoServer) -> Iterator[FaultProxy]:
    """The fault suite's proxy in front of the session's moto (serialising: see helpers.py)."""
    with FaultProxy(kinesis_endpoint.url) as proxy:
        yield proxy


@pytest.fixture
def rig(make_stream: Callable[..., str], kinesis: Any, fault_proxy: FaultProxy,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher],
        tmp_path: Path, request: pytest.FixtureRequest) -> Rig:
    stream = make_stream()
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml(stream))
    return Rig(stream, routes, kinesis, fault_proxy, gateway_process, publisher, request.node.name)


@pytest.fixture
def make_spool_rig(tmp_path: Path, mosquitto_factory: Callable[..., Any],
                   gateway_process: Callable[..., GatewayProcess],
                   publisher: Callable[..., Publisher]) -> Iterator[Callable[..., SpoolRig]]:
    """make_spool_rig(shards=1, throttle=False, qos=1) -> a SpoolRig (tests/fault/spool_rig.py):
    Mosquitto with the stock max_queued_messages 1000, the bench Kinesis endpoint (throttling per
    shard like Kinesis if asked) behind a TCP proxy, and a spool directory in tmp_path."""
    from bench.services import Endpoint
    from tests.support.tcpproxy import TcpProxy

    opened: list[Any] = []

    def make(shards: int = 1, throttle: bool = False, qos: int = 1,
             spool_dir: Path | None = None) -> SpoolRig:
        broker = mosquitto_factory(max_queued_messages=STOCK_QUEUE)
        (tmp_path / "endpoint").mkdir(exist_ok=True)
        endpoint = Endpoint([STREAM], tmp_path / "endpoint", shards=shards, throttle=throttle).start()
        opened.append(endpoint)
        proxy = TcpProxy(endpoint.port).start()
        opened.append(proxy)
        routes = tmp_path / "spool-routes.yaml"
        routes.write_text(spool_routes(qos=qos))
        return SpoolRig(broker, endpoint, proxy, spool_dir or tmp_path / "spool", routes,
                        gateway_process, publisher)

    yield make
    for thing in reversed(opened):
        thing.stop()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., DeliveryReport]:
    """report(acked, records, sent=..., **figures) -> DeliveryReport, printed and appended to
    $GATEWAY_TEST_REPORT as `<test> seed=<s> <report> duration_s=<d> k=v...`."""
    started = time.monotonic()

    def make(acked: set[int], records: list[Any], *, sent: int | set[int] | None = None,
             **figures: Any) -> DeliveryReport:
        rep = check_delivery(acked, records, sent=sent)
        extra = " ".join(f"{k}={v}" for k, v in figures.items())
        line = (f"{request.node.name} seed={SEED} {rep} duration_s={time.monotonic() - started:.1f}"
                + (f" {extra}" if extra else ""))
        print(f"\n[fault] {line}")
        target = os.environ.get("GATEWAY_TEST_REPORT")
        if target:
            with open(target, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        return rep

    return make
