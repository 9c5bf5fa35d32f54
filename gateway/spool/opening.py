"""A spool that may not open yet: the gateway starts even when its spool directory cannot be written.

Why: a read-only volume or a full disk at start must not crash the gateway or make it loop
(docs/spool.md). ``SpoolStore.open`` raises ``SpoolUnavailable`` then; this wrapper keeps the
gateway running as if the spool were full (``block``: nothing is acknowledged, nothing more is
read from the broker) and opens the spool at the first write attempt that succeeds — the
committer tries every second.

Invariant owned here: until the store is open, every write raises ``SpoolUnavailable`` (with the
reason of the last attempt) and reads find nothing; once open, every call goes to the store.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

from gateway.spool.schema import SpooledRecord, SpoolRow, SpoolUnavailable
from gateway.spool.store import OpenReport, SpoolStore

__all__ = ["LazyStore"]


class LazyStore:
    """``SpoolStore`` once ``open_store()`` succeeds; ``SpoolUnavailable`` for writes until then."""

    def __init__(self, open_store: Callable[[], tuple[SpoolStore, OpenReport]], capacity_bytes: int,
                 on_open: Callable[[OpenReport], None] = lambda _: None, *, drops_oldest: bool = False) -> None:
        self._open_store = open_store
        self._capacity = capacity_bytes
        self.drops_oldest = drops_oldest
        self._on_open = on_open
        self._store: SpoolStore | None = None
        self._lock = threading.Lock()
        self.problem: SpoolUnavailable | None = None

    def try_open(self) -> SpoolStore | None:
        """Open the store if it is not open yet; None (and ``problem`` set) when it cannot be."""
        with self._lock:
            if self._store is not None:
                return self._store
            try:
                store, report = self._open_store()
            except SpoolUnavailable as problem:
                self.problem = problem
                return None
            self._store, self.problem = store, None
        self._on_open(report)
        return store

    def _writable(self) -> SpoolStore:
        store = self._store or self.try_open()
        if store is None:
            assert self.problem is not None
            raise self.problem
        return store

    @property
    def is_open(self) -> bool:
        return self._store is not None

    def append(self, rows: Sequence[SpoolRow], sizes: Sequence[int] | None = None) -> list[int]:
        return self._writable().append(rows, sizes)

    def take_dropped(self) -> dict[str, int]:
        return self._store.take_dropped() if self._store is not None else {}

    def read(self, after_id: int, max_records: int, max_bytes: int) -> list[SpooledRecord]:
        return self._store.read(after_id, max_records, max_bytes) if self._store is not None else []

    def delete(self, ids: Iterable[int], sizes: Sequence[int] | None = None) -> None:
        self._writable().delete(ids, sizes)

    def replace(self, delete: Iterable[int], add: Sequence[SpoolRow]) -> list[int]:
        return self._writable().replace(delete, add)

    @property
    def records(self) -> int:
        return self._store.records if self._store is not None else 0

    @property
    def bytes(self) -> int:
        return self._store.bytes if self._store is not None else 0

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def undecodable(self) -> int:
        return self._store.undecodable if self._store is not None else 0

    @property
    def commits(self) -> int:
        return self._store.commits if self._store is not None else 0

    def oldest_arrival_ms(self) -> int | None:
        return self._store.oldest_arrival_ms() if self._store is not None else None

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
