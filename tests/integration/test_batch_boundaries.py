"""PutRecords batch boundaries through the real gateway (docs/delivery.md#how-the-guarantees-are-tested).

The gateway talks to moto through the fault proxy in pass-through mode, so every PutRecords
request it makes is recorded (entries, Kinesis-counted bytes, outcome). Moto enforces the same
request limits as Kinesis (500 entries, 5 MiB, 1 MiB per record), so a batch cut one entry or one
byte too large comes back as ValidationException / InvalidArgumentException for the whole
request; that must never happen. A long linger (KINESIS_LINGER_MS) makes the batches fill
deterministically: a batch goes out when it is full, or after the linger with what is left.

Each scenario has its own route and stream; records are keyed by the last topic level, so every
record is identified by its key when read back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.gatewayproc import GatewayProcess
from tests.support.publisher import Publisher
from tests.support.services import read_all, wait_for_records

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MIB = 1024 * 1024
LIMIT_REQUEST = 5 * MIB
LINGER_MS = 4000

# scenario -> list of (partition key, data size); the key's UTF-8 bytes count towards the limits
SCENARIOS: dict[str, list[tuple[str, int]]] = {
    "n500": [(f"a{i:03d}", 40) for i in range(500)],
    "n501": [(f"b{i:03d}", 40) for i in range(501)],
    # five records of exactly 1 MiB counting the 2-character key: exactly 5 MiB in one request
    "mib5": [(f"c{i}", MIB - 2) for i in range(5)],
    # the same plus a record of one byte (key "z", no data): 5 MiB + 1 must be split
    "mib5p1": [(f"d{i}", MIB - 2) for i in range(5)] + [("z", 0)],
    # at the limit with a multi-byte key (20 bytes for 10 characters), then one byte over it
    "limit": [("é" * 10, MIB - 20), ("ok", 10), ("ü" * 10, MIB - 19)],
}
EXPECTED_SPLIT = {"n500": [500], "n501": [500, 1], "mib5": [5], "mib5p1": [5, 1], "limit": [2]}
OVER_LIMIT = {"limit": ["ü" * 10]}


def _routes(path: Path, streams: dict[str, str], dead: str) -> Path:
    lines = ["version: 1", "defaults:", "  qos: 1", "  dead_letter:", f"    stream: {dead}", "routes:"]
    for name, stream in streams.items():
        lines += [f"  - name: {name}", f'    topic: "bb/{name}/+"', f"    stream: {stream}",
                  "    format: raw", '    partition_key: "topic(`-1`)"']
    path.write_text("\n".join(lines) + "\n")
    return path


def _publish(pub: Publisher, scenario: str) -> None:
    items = SCENARIOS[scenario]
    pub.topic_for = lambda seq: f"bb/{scenario}/{items[seq][0]}"
    pub.payload = lambda seq: b"x" * items[seq][1]
    pub.publish_range(len(items))
    assert pub.wait_acked(60), f"{scenario}: broker did not ack every publish"


def _wait_requests(proxy: FaultProxy, stream: str, entries: int, timeout: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        reqs = [r for r in proxy.put_requests() if r.stream == stream]
        if sum(r.entries for r in reqs) >= entries or time.monotonic() > deadline:
            return reqs
        time.sleep(0.1)


def test_batches_at_500_entries_and_5_mib_are_cut_exactly_and_never_rejected(
        fault_proxy: FaultProxy, make_stream: Callable[..., str], kinesis: Any,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher],
        tmp_path: Path) -> None:
    streams = {name: make_stream(suffix=f"-{name}") for name in SCENARIOS}
    dead = make_stream(suffix="-dead")
    routes = _routes(tmp_path / "routes.yaml", streams, dead)
    gw = gateway_process(routes, kinesis_url=fault_proxy.url,
                         extra_env={"KINESIS_LINGER_MS": str(LINGER_MS), "GATEWAY_BACKLOG": "5000"})
    pub = publisher(max_inflight=1000)

    for scenario, items in SCENARIOS.items():
        stream = streams[scenario]
        expected_keys = Counter(k for k, _ in items) - Counter(OVER_LIMIT.get(scenario, []))
        started = time.monotonic()
        _publish(pub, scenario)
        reqs = _wait_requests(fault_proxy, stream, sum(expected_keys.values()), timeout=LINGER_MS / 1000 + 30)
        split = [r.entries for r in reqs]
        print(f"[batch] {scenario}: requests {split}, bytes {[r.kinesis_bytes for r in reqs]}, "
              f"{time.monotonic() - started:.1f}s")
        assert all(r.outcome == "pass" for r in reqs), [(r.entries, r.outcome) for r in reqs]
        assert all(1 <= r.entries <= 500 and r.kinesis_bytes <= LIMIT_REQUEST for r in reqs)
        assert split == EXPECTED_SPLIT[scenario], split
        records = wait_for_records(kinesis, stream, sum(expected_keys.values()), timeout=20)
        assert Counter(r["partition_key"] for r in records) == expected_keys  # no loss, no dups
        if scenario == "mib5":
            assert reqs[0].kinesis_bytes == LIMIT_REQUEST  # exactly 5 MiB went as one request
        if scenario == "limit":
            sizes = {r["partition_key"]: len(r["data"]) + len(r["partition_key"].encode())
                     for r in records}
            assert sizes["é" * 10] == MIB  # exactly at the limit counting the UTF-8 key

    # the one record over the limit went to the dead letter, never to Kinesis' main stream
    dead_records = wait_for_records(kinesis, dead, 1, timeout=20)
    assert len(dead_records) == 1 and b'"reason":"record too large"' in dead_records[0]["data"]
    assert gw.metric("records_dead_lettered_total", route="limit") == 1
    every = fault_proxy.put_requests()
    assert not [r for r in every if r.outcome != "pass"], Counter(r.outcome for r in every)
    assert max(r.entries for r in every) <= 500
    assert max(r.kinesis_bytes for r in every) <= LIMIT_REQUEST
    assert gw.alive
    assert "Traceback" not in gw.stderr_text() + gw.stdout_text()
    assert sum(len(read_all(kinesis, s)) for s in streams.values()) == \
        sum(len(v) for v in SCENARIOS.values()) - 1
