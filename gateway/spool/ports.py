"""The seams of the spool package: what its threads need of the store, the Kinesis sink, the
pipeline's tokens and the metrics, as protocols, so that each side can be faked in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from gateway.model import Message, Record
from gateway.spool.schema import SpooledRecord, SpoolRow

__all__ = ["Inner", "InnerMetrics", "InnerSink", "Origin", "RetryWatch", "SenderMetrics",
           "SpoolMetrics", "Store"]

class Store(Protocol):
    """``gateway.spool.store.SpoolStore`` as the spool's threads use it."""

    def append(self, rows: Sequence[SpoolRow], sizes: Sequence[int] | None = None) -> list[int]: ...
    def take_dropped(self) -> dict[str, int]: ...
    def read(self, after_id: int, max_records: int, max_bytes: int) -> list[SpooledRecord]: ...
    def delete(self, ids: Iterable[int], sizes: Sequence[int] | None = None) -> None: ...
    def replace(self, delete: Iterable[int], add: Sequence[SpoolRow]) -> list[int]: ...
    @property
    def records(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def capacity_bytes(self) -> int: ...
    @property
    def drops_oldest(self) -> bool:
        """``drop_oldest``: an append may delete the oldest rows, which the sender may be reading."""


class Inner(Protocol):
    """``gateway.sink.kinesis.KinesisSink[int]`` as the sender uses it."""

    def put(self, entries: Sequence[tuple[Record, int]]) -> None: ...
    @property
    def pending_records(self) -> int: ...


class SenderMetrics(Protocol):
    def records_dead_lettered(self, route: str, n: int) -> None: ...
    def records_dropped(self, route: str, reason: str, n: int) -> None: ...
    def spool_dropped(self, route: str, reason: str, n: int) -> None: ...


class Origin(Protocol):
    """What the pipeline's token tells the spool about a record (``gateway.pipeline.ports.Token``)."""

    @property
    def message(self) -> Message: ...
    @property
    def is_dead_letter(self) -> bool: ...
    @property
    def dead_letter(self) -> str | None:
        """The route's dead letter at routing time: ``kinesis:<stream>``, ``mqtt:<topic>`` or None."""


class InnerSink(Protocol):
    """``gateway.sink.kinesis.KinesisSink[int]``: what the spooled sink passes through to it."""

    def put(self, entries: Sequence[tuple[Record, int]]) -> None: ...
    def start(self) -> None: ...
    def drain(self, deadline_s: float) -> bool: ...
    def close(self, timeout_s: float = 1.0) -> None: ...
    def check_streams(self, streams: Iterable[str]) -> None: ...
    def set_aggregate_routes(self, routes: Iterable[str]) -> None: ...
    def stream_problems(self) -> dict[str, str]: ...
    @property
    def pending_records(self) -> int: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def alive(self) -> bool: ...
    @property
    def last_error(self) -> str | None: ...


class InnerMetrics(Protocol):
    """``gateway.sink.kinesis.SinkMetrics``."""

    def records_put(self, route: str, stream: str, n: int) -> None: ...
    def records_failed(self, route: str, stream: str, reason: str, n: int) -> None: ...
    def records_retried(self, stream: str, n: int) -> None: ...
    def batch_sent(self, stream: str, n_records: int, seconds: float) -> None: ...
    def callback_error(self) -> None: ...


class RetryWatch:
    """The inner sink's metrics, passed through; a retry also tells the pacer (``on_retried``)."""

    def __init__(self, metrics: InnerMetrics, on_retried: Callable[[str, int], None]) -> None:
        self._metrics, self._on_retried = metrics, on_retried

    def records_put(self, route: str, stream: str, n: int) -> None:
        self._metrics.records_put(route, stream, n)

    def records_failed(self, route: str, stream: str, reason: str, n: int) -> None:
        self._metrics.records_failed(route, stream, reason, n)

    def records_retried(self, stream: str, n: int) -> None:
        self._metrics.records_retried(stream, n)
        self._on_retried(stream, n)

    def batch_sent(self, stream: str, n_records: int, seconds: float) -> None:
        self._metrics.batch_sent(stream, n_records, seconds)

    def callback_error(self) -> None:
        self._metrics.callback_error()


class SpoolMetrics(Protocol):
    """What the spooled sink reports (gateway.ops.metrics implements it)."""

    def spool_commit(self, seconds: float) -> None: ...
    def spool_dropped(self, route: str, reason: str, n: int) -> None: ...
    def records_dead_lettered(self, route: str, n: int) -> None: ...
    def records_dropped(self, route: str, reason: str, n: int) -> None: ...
    def callback_error(self) -> None: ...


