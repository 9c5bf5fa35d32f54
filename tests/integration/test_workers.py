"""`run --workers N`: N processes share the subscriptions through a shared-subscription group."""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gatewayproc import GatewayProcess, write_routes
from tests.support.oracle import emit, wait_delivered, wait_until
from tests.support.services import free_port_range

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _put_by(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "mqtt_kinesis_gateway_records_put" for sample in family.samples
               if sample.name.endswith("_total"))


def _two_workers_deliver_2000(tmp_path: Path, stream: str, kinesis: Any,
                              gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Any],
                              extra_env: dict[str, str], name: str) -> GatewayProcess:
    routes = write_routes(tmp_path / "routes.yaml", f"""\
version: 1
routes:
  - name: welders
    topic: "welder/#"
    stream: {stream}
    partition_key: name
    qos: 1
""")
    gw = gateway_process(routes, args=["run", "--routes", str(routes), "--workers", "2"],
                         http_port=free_port_range(2), extra_env=extra_env)
    # gateway_process waits for worker 0; the broker shares only among members already subscribed
    assert wait_until(lambda: _ready(gw.http_port + 1), 30), gw.output_tail()
    pub = publisher()
    pub.publish_range(2000)
    assert pub.wait_acked(60)
    report, _ = wait_delivered(kinesis, stream, pub.acked, len(pub.sent), timeout=60)
    shares = [_put_by(gw.http_port), _put_by(gw.http_port + 1)]
    emit(name, f"{report} | records put by worker 0 and 1: {shares}")
    report.assert_no_loss()
    assert report.duplicates == 0
    assert all(share > 0 for share in shares) and sum(shares) == 2000, shares
    return gw


def test_two_workers_split_the_messages_and_lose_or_duplicate_nothing(
        tmp_path: Path, kinesis_stream: str, kinesis: Any,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Any]) -> None:
    gw = _two_workers_deliver_2000(tmp_path, kinesis_stream, kinesis, gateway_process, publisher, {}, "workers")
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(30) == 0, gw.output_tail()


def test_two_workers_with_the_spool_each_keep_a_spool_of_their_own_and_lose_nothing(
        tmp_path: Path, kinesis_stream: str, kinesis: Any,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Any]) -> None:
    """One SQLite spool per process (docs/spool.md#settings): worker i under worker-<i>, each locked
    by its own process; both acknowledge from their spool and drain it on SIGTERM."""
    spool = tmp_path / "spool"
    gw = _two_workers_deliver_2000(tmp_path, kinesis_stream, kinesis, gateway_process, publisher,
                                   {"GATEWAY_SPOOL_DIR": str(spool)}, "workers-spool")
    assert sorted(p.name for p in spool.iterdir()) == ["worker-0", "worker-1"]
    assert all((spool / f"worker-{i}" / "spool.db").is_file() for i in (0, 1))
    gw.signal(signal.SIGTERM)
    assert gw.wait_exit(30) == 0, gw.output_tail()
    for i in (0, 1):
        inspected = subprocess.run([*gw.command, "spool", "inspect", str(spool / f"worker-{i}")], env=gw.env,
                                   capture_output=True, text=True, timeout=60)
        assert inspected.returncode == 0 and "records 0," in inspected.stdout, (i, inspected.stdout, inspected.stderr)
