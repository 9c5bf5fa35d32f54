"""The common delivery oracle of the fault suite (docs/delivery.md#how-the-guarantees-are-tested).

"No loss" means every seq PUBACKed to the publisher appears in Kinesis at least once. Duplicates
are counted and reported, never failed on here: at-least-once allows them, and each test decides
its own bound. The report prints as one line so a test's output can be quoted in the closing note.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

KPL_MAGIC = b"\xf3\x89\x9a\xc2"


def _deaggregate(data: bytes) -> list[bytes]:
    """User records inside one KPL-aggregated record (magic + protobuf + md5), else [data]."""
    if not data.startswith(KPL_MAGIC):
        return [data]
    from aws_kinesis_agg import messages_pb2  # test dependency, only for aggregated routes

    agg = messages_pb2.AggregatedRecord()
    agg.ParseFromString(data[len(KPL_MAGIC):-16])
    return [r.data for r in agg.records]


def seqs_in(data: bytes) -> list[int]:
    """Seqs carried by one Kinesis record: a JSON object with "seq", JSON lines, or KPL aggregate.

    Data that is not JSON or has no seq yields nothing (counted as `foreign` by the oracle)."""
    out: list[int] = []
    for blob in _deaggregate(data):
        for line in blob.splitlines() or [blob]:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, Mapping) and isinstance(doc.get("seq"), int):
                out.append(doc["seq"])
    return out


@dataclass
class DeliveryReport:
    sent: int
    acked: int
    received_unique: int
    lost: list[int]
    duplicates: int
    foreign: int = 0
    extra: list[int] = field(default_factory=list)

    def assert_no_loss(self) -> None:
        if self.lost:
            raise AssertionError(f"{len(self.lost)} acked message(s) missing from Kinesis, first "
                                 f"seqs {self.lost[:20]}; {self}")

    def __str__(self) -> str:
        return (f"sent={self.sent} acked={self.acked} received_unique={self.received_unique} "
                f"lost={len(self.lost)} duplicates={self.duplicates} "
                f"unacked_but_delivered={len(self.extra)} foreign_records={self.foreign}")


def check_delivery(acked_seqs: Iterable[int], records: Iterable[Mapping[str, Any] | bytes], *,
                   sent: int | Iterable[int] | None = None,
                   extract: Callable[[bytes], list[int]] = seqs_in) -> DeliveryReport:
    """Compare acked seqs with the records read from Kinesis (dicts with "data", or raw bytes).

    `duplicates` counts copies beyond the first of each seq; `extra` lists seqs delivered that
    were never acked (fine: the broker took them but the PUBACK was lost, or publish raced a cut).
    """
    acked = set(acked_seqs)
    counts: Counter[int] = Counter()
    foreign = 0
    for rec in records:
        data = rec if isinstance(rec, bytes | bytearray) else rec["data"]
        found = extract(bytes(data))
        if not found:
            foreign += 1
        counts.update(found)
    n_sent = sent if isinstance(sent, int) else len(set(sent)) if sent is not None else len(acked)
    return DeliveryReport(
        sent=n_sent, acked=len(acked), received_unique=len(counts),
        lost=sorted(acked - counts.keys()),
        duplicates=sum(c - 1 for c in counts.values()),
        foreign=foreign, extra=sorted(counts.keys() - acked))


def emit(test: str, line: str) -> None:
    """The figures of one test: stdout for `pytest -s`, and the report file for the closing note."""
    text = f"[{test}] {line}"
    print(text, flush=True)
    path = os.environ.get("GATEWAY_TEST_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(text + "\n")


def wait_until(predicate: Callable[[], bool], timeout: float, poll_s: float = 0.1) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; what it last said."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def wait_delivered(kinesis: Any, stream: str, acked: set[int], sent: int, timeout: float,
                   poll_s: float = 1.0) -> tuple[DeliveryReport, list[dict[str, Any]]]:
    """Poll the stream until every acked seq is in it (or timeout); the last report either way."""
    from tests.support.services import read_all

    deadline = time.monotonic() + timeout
    while True:
        records = read_all(kinesis, stream)
        report = check_delivery(acked, records, sent=sent)
        if not report.lost or time.monotonic() >= deadline:
            return report, records
        time.sleep(poll_s)
