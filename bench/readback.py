"""Turn what the endpoint holds back into messages: loss, duplicates and publish → readable latency.

Each record's data is the published JSON (plus the route's newline), or a KPL aggregate of such
records (magic 0xF3899AC2, protobuf body, MD5 trailer), which is unpacked here with a minimal
protobuf reader so the bench does not depend on a deaggregation library. Latency of a message is
the endpoint's receive time of the first record carrying its `seq` minus the `t` it was published
with; both clocks are this machine's `time.time_ns()`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

KPL_MAGIC = b"\xf3\x89\x9a\xc2"


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: varints as int, length-delimited as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        kind = key & 7
        if kind == 0:
            value, i = _varint(buf, i)
        elif kind == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif kind == 1:
            value, i = buf[i:i + 8], i + 8
        elif kind == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {kind}")
        yield key >> 3, value


def deaggregate(data: bytes) -> list[bytes]:
    """The user records inside one Kinesis record (itself, if it is not a KPL aggregate)."""
    if not data.startswith(KPL_MAGIC) or len(data) < 20:
        return [data]
    body, digest = data[4:-16], data[-16:]
    if hashlib.md5(body).digest() != digest:
        return [data]
    out = []
    for num, value in _fields(body):
        if num == 3:
            out.extend(v for n, v in _fields(value) if n == 3)
    return out


@dataclass
class Delivery:
    """What one subject delivered for seqs 0..expected-1."""

    expected: int
    kinesis_records: int = 0      # records as stored by Kinesis (aggregates count once)
    user_records: int = 0         # after deaggregation, warm-up excluded
    unique: int = 0
    duplicates: int = 0
    lost: int = 0
    first_ns: int = 0             # first readable
    complete_ns: int = 0          # when the last distinct seq became readable
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    undecodable: int = 0
    requests: int = 0             # distinct endpoint receive times = PutRecord(s) calls that held data
    request_gap_ms_p50: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def percentile(sorted_values: list[int], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k] / 1e6


def analyse(records: list[list[Any]], expected: int, seq_lo: int = 0) -> Delivery:
    """Loss, duplicates, latency for seqs seq_lo..seq_lo+expected-1 from endpoint records."""
    d = Delivery(expected=expected)
    first_seen: dict[int, int] = {}
    arrivals: set[int] = set()
    latencies: list[int] = []
    hi = seq_lo + expected
    for recv_ns, _key, data_b64 in records:
        raw = base64.b64decode(data_b64)
        inner = deaggregate(raw)
        counted = False
        for blob in inner:
            try:
                doc = orjson.loads(blob)
                seq, t = doc["seq"], doc["t"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                d.undecodable += 1
                continue
            if not seq_lo <= seq < hi:
                continue
            counted = True
            arrivals.add(recv_ns)
            d.user_records += 1
            if seq in first_seen:
                d.duplicates += 1
                continue
            first_seen[seq] = recv_ns
            latencies.append(recv_ns - t)
        d.kinesis_records += counted
    d.unique = len(first_seen)
    d.lost = expected - d.unique
    if first_seen:
        d.first_ns = min(first_seen.values())
        d.complete_ns = max(first_seen.values())
    times = sorted(arrivals)
    d.requests = len(times)
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    d.request_gap_ms_p50 = percentile(gaps, 0.5)
    latencies.sort()
    d.p50_ms, d.p99_ms = percentile(latencies, 0.50), percentile(latencies, 0.99)
    d.max_ms = latencies[-1] / 1e6 if latencies else None
    return d
