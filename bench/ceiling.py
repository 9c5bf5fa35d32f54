"""The endpoint alone: how many records/s it takes before any subject is measured against it.

Load: `clients` processes, each with one keep-alive HTTP connection, sending the same pre-built
500-record PutRecords body (welder payloads, base64, as botocore sends them) back to back, and one
process sending single-record PutRecord requests (the naive bridge's shape). Two figures per
shape: the records/s observed (the load generator shares the 2 cores, so this is a floor) and the
CPU-bound ceiling, records per CPU-second of the endpoint process, which is what it could take on
one core of its own.
"""

from __future__ import annotations

import base64
import http.client
import multiprocessing as mp
import time
from typing import Any

import orjson

from bench.measure import cpu_now
from bench.publisher import payload
from bench.services import HOST, Endpoint

STREAM = "bench-ceiling"


def _body(records: int, single: bool) -> bytes:
    data = base64.b64encode(payload(0, time.time_ns()) + b"\n").decode()
    if single:
        return orjson.dumps({"StreamName": STREAM, "Data": data, "PartitionKey": "device123"})
    return orjson.dumps({"StreamName": STREAM,
                         "Records": [{"Data": data, "PartitionKey": "device123"}] * records})


def _client(port: int, seconds: float, single: bool, out: Any) -> None:
    body = _body(500, single)
    target = "Kinesis_20131202.PutRecord" if single else "Kinesis_20131202.PutRecords"
    headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target}
    conn = http.client.HTTPConnection(HOST, port)
    conn.connect()
    import socket
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conn.request("POST", "/", body, headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"endpoint answered {resp.status}")
        n += 1
    conn.close()
    out.put(n * (1 if single else 500))


def _measure(endpoint: Endpoint, clients: int, seconds: float, single: bool) -> dict[str, Any]:
    endpoint.reset()
    q: Any = mp.Queue()
    procs = [mp.Process(target=_client, args=(endpoint.port, seconds, single, q)) for _ in range(clients)]
    c0, t0 = cpu_now(endpoint.proc.pid), time.monotonic()  # type: ignore[union-attr]
    for p in procs:
        p.start()
    total = sum(q.get(timeout=seconds + 30) for _ in procs)
    for p in procs:
        p.join(timeout=10)
    elapsed = time.monotonic() - t0
    cpu = cpu_now(endpoint.proc.pid) - c0  # type: ignore[union-attr]
    held = endpoint.count(STREAM)
    endpoint.reset()
    return {"shape": "PutRecord x1" if single else "PutRecords x500", "clients": clients,
            "records": total, "held": held, "observed_records_per_s": total / elapsed,
            "endpoint_cpu_s": cpu, "endpoint_cpu_us_per_record": 1e6 * cpu / total if total else None,
            "cpu_bound_ceiling_records_per_s": total / cpu if cpu else None}


def measure_ceiling(endpoint: Endpoint, seconds: float = 3.0) -> dict[str, Any]:
    """Ceilings for the batched shape (the gateway) and the single-record shape (naive bridge)."""
    if STREAM not in endpoint.stats()["streams"]:
        conn = http.client.HTTPConnection(HOST, endpoint.port)
        headers = {"Content-Type": "application/x-amz-json-1.1",
                   "X-Amz-Target": "Kinesis_20131202.CreateStream"}
        conn.request("POST", "/", orjson.dumps({"StreamName": STREAM, "ShardCount": 1}), headers)
        conn.getresponse().read()
        conn.close()
    return {"batched": _measure(endpoint, 2, seconds, single=False),
            "single": _measure(endpoint, 1, seconds, single=True)}
