"""SpoolStore: the records between routing and Kinesis, on local disk, in one SQLite database.

Why: an MQTT message may be acknowledged once its records are durable here, so a power loss, a
kill -9 or an hour without AWS costs nothing the broker was told is safe (docs/spool.md).

Invariants owned here:
- ``append``/``replace``/``delete`` are each one transaction, durable when they return (WAL,
  ``synchronous=FULL``); a failure rolls back, leaves the spool as it was, and raises
  ``SpoolUnavailable`` (or ``SpoolFull`` for the ``block`` policy) — never a half-written spool;
- ids only grow (AUTOINCREMENT: an id is never reused, even after the spool was empty), so read
  order is arrival order and a reader's ``after_id`` never skips a row;
- ``records`` and ``bytes`` are the spool's contents, counted once at open and then kept in step
  with each commit; ``bytes`` never exceeds ``capacity_bytes`` after an ``append``;
- ``read`` holds at most one batch in memory, and a row that does not decode is skipped, counted
  and deleted, never raised;
- one process at a time: the store holds an exclusive lock on ``spool.lock`` while open.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Final

from gateway.spool.check import OpenReport, count_rows, examine, lock_spool, open_report, quarantine
from gateway.spool.schema import (
    DB_NAME,
    SIZE_SQL,
    SpooledRecord,
    SpoolRow,
    SpoolUnavailable,
    configure,
    create_schema,
    encode,
    schema_problem,
    text_factory,
    unavailable,
)
from gateway.spool.steps import (
    delete_counted,
    delete_rows,
    insert_rows,
    make_room,
    max_parameters,
    read_batches,
    read_rows,
    rows_per_insert,
)

__all__ = ["WHEN_FULL", "OpenReport", "SpoolFull", "SpoolRow", "SpoolStore", "SpoolUnavailable", "SpooledRecord"]

WHEN_FULL: Final = ("block", "drop_oldest")
_VACUUM_PAGES: Final = 4096              # pages given back per incremental vacuum step


class SpoolFull(Exception):
    """``block`` policy: the rows would take the spool past its capacity; nothing was written."""


def _environmental(exc: sqlite3.Error) -> bool:
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    return name.startswith(("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_BUSY",
                            "SQLITE_LOCKED", "SQLITE_PERM")) and name != "SQLITE_IOERR_SHORT_READ"


class SpoolStore:
    """The spool of one gateway process. Thread use: the committer calls ``append``/``replace``, the
    sender ``read``/``delete``/``replace``; writes are serialised by a lock on one connection, reads
    use a second connection (WAL readers never wait for the writer's fsync)."""

    def __init__(self, directory: str, lock_fd: int, max_bytes: int, when_full: str,
                 clock: Callable[[], float]) -> None:
        self.directory = directory
        self.capacity_bytes = max_bytes
        self.drops_oldest = when_full == "drop_oldest"
        self._lock_fd = lock_fd
        self._when_full = when_full
        self._clock = clock
        self._db = os.path.join(directory, DB_NAME)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._records = 0
        self._bytes = 0
        self._dropped: Counter[str] = Counter()
        self._undecodable = 0
        self._commits = 0
        self._deletes_since_vacuum = 0
        self.last_commit_seconds = 0.0
        self._resync = True
        self._created = False
        self._max_parameters = 999           # SQLite's smallest default; the connection's limit once open
        self._rows_per_insert = 1

    # -- opening ------------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str, *, max_bytes: int, when_full: str = "block",
             clock: Callable[[], float] = time.time) -> tuple[SpoolStore, OpenReport]:
        """Open (or create) the spool in ``directory``: check it, move a damaged one aside, start a
        fresh one. Raises ``SpoolUnavailable`` only when no usable spool can be made."""
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {', '.join(WHEN_FULL)}, not {when_full!r}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise unavailable(directory, exc, "creating the spool directory") from None
        lock_fd = lock_spool(directory)
        try:
            store = cls(directory, lock_fd, max_bytes, when_full, clock)
            report = store._open_checked()
        except BaseException:
            os.close(lock_fd)
            raise
        return store, report

    def _open_checked(self) -> OpenReport:
        found = examine(self.directory)
        problem, moved_to, lost = found.problem, None, None
        if problem is not None:
            lost = found.records if found.records is not None else count_rows(Path(self._db))
            moved_to = quarantine(self.directory, self._clock())
        try:
            fresh = self._connect()
        except sqlite3.DatabaseError as exc:  # damage the check could not see: move it aside once, no loop
            self._close_connections()
            if moved_to is not None:
                raise unavailable(self.directory, exc, "creating a fresh spool") from None
            problem, lost = " ".join(str(exc).split()), count_rows(Path(self._db))
            moved_to = quarantine(self.directory, self._clock())
            try:
                fresh = self._connect()
            except sqlite3.Error as again:
                self._close_connections()
                raise unavailable(self.directory, again, "creating a fresh spool") from None
        except BaseException:
            self._close_connections()
            raise
        return open_report(self.directory, self._records, self._bytes, self.capacity_bytes, fresh=fresh,
                           moved_to=moved_to, problem=problem, lost=lost)

    def _connect(self) -> bool:
        """Open both connections (creating the schema in an empty database); True if created.
        Environmental failures raise ``SpoolUnavailable``; damage raises ``sqlite3.DatabaseError``."""
        try:
            self._connect_writer()
            reader = sqlite3.connect(self._db, isolation_level=None, timeout=5.0, check_same_thread=False)
            self._reader = reader
            reader.execute("PRAGMA query_only=1")
            reader.text_factory = text_factory
            self._recount()
            return self._created
        except sqlite3.Error as exc:
            if _environmental(exc):
                raise unavailable(self.directory, exc, "opening the spool") from None
            raise
        except OSError as exc:
            raise unavailable(self.directory, exc, "opening the spool") from None

    def _connect_writer(self) -> None:
        writer = sqlite3.connect(self._db, isolation_level=None, timeout=5.0, check_same_thread=False)
        self._writer = writer
        self._max_parameters = max_parameters(writer)
        self._rows_per_insert = rows_per_insert(writer)
        self._created = schema_problem(writer) == "empty"
        if self._created:
            create_schema(writer)
        configure(writer)
        problem = schema_problem(writer)
        if problem is not None:
            raise sqlite3.DatabaseError(problem)

    def _recount(self) -> None:
        assert self._writer is not None
        count, total = self._writer.execute(f"SELECT count(*), total({SIZE_SQL}) FROM records").fetchone()
        self._records, self._bytes, self._resync = int(count), int(total), False

    def _close_connections(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._reader = self._writer = None

    # -- writing ------------------------------------------------------------------------------------

    def _write(self, doing: str, body: Callable[[sqlite3.Connection], tuple[int, int]], *,
               one_statement: bool = False) -> None:
        """Run ``body`` in one transaction; it returns the change in (records, bytes). On any error
        roll back and raise ``SpoolUnavailable``; totals change only once the commit returned.
        ``one_statement``: ``body`` runs a single statement, which SQLite commits on its own
        (autocommit, as durably as a COMMIT): one call into the engine instead of three, and each
        call gives up the GIL and then waits to take it back from the busy threads."""
        if self._writer is None:  # a failure closed it: reopen (the disk may have room again)
            try:
                self._connect_writer()
            except (sqlite3.Error, OSError) as exc:
                self._close_writer()
                raise unavailable(self.directory, exc, doing) from None
        conn = self._writer
        assert conn is not None
        try:
            if self._resync:
                self._recount()
            started = time.perf_counter()
            if one_statement:
                d_records, d_bytes = body(conn)
            else:
                conn.execute("BEGIN IMMEDIATE")
                d_records, d_bytes = body(conn)
                conn.execute("COMMIT")
            self.last_commit_seconds = time.perf_counter() - started
        except (sqlite3.Error, OSError) as exc:
            self._rollback()
            raise unavailable(self.directory, exc, doing) from None
        except BaseException:
            self._rollback()
            raise
        self._records += d_records
        self._bytes += d_bytes
        self._commits += 1

    def _rollback(self) -> None:
        """After a failed write the totals are recounted before the next one (a failed COMMIT may
        still have reached the disk); a connection that cannot even roll back is reopened."""
        self._resync = True
        conn = self._writer
        try:
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(sqlite3.Error):
                self._writer.close()
            self._writer = None

    def append(self, rows: Sequence[SpoolRow], sizes: Sequence[int] | None = None) -> list[int]:
        """Append ``rows`` in one durable transaction; return their ids, in order. ``sizes``, when
        given, are the rows' ``row_size``s."""
        if not rows:
            return []
        encoded = [encode(row) for row in rows] if sizes is None else list(map(encode, rows, sizes))
        needed = sum(params[9] for params in encoded)
        if self._when_full == "block" and self._bytes + needed > self.capacity_bytes:
            raise SpoolFull(f"spool {self.directory}: full ({self._bytes} of {self.capacity_bytes} bytes;"
                            f" {len(rows)} records of {needed} bytes wait)")
        if needed > self.capacity_bytes:
            raise SpoolFull(f"spool {self.directory}: {len(rows)} records of {needed} bytes exceed its"
                            f" capacity of {self.capacity_bytes} bytes")
        ids: list[int] = []
        dropped: Counter[str] = Counter()

        def body(conn: sqlite3.Connection) -> tuple[int, int]:
            dropped.clear()
            excess = self._bytes + needed - self.capacity_bytes
            gone, freed = make_room(conn, excess, dropped) if self.drops_oldest and excess > 0 else (0, 0)
            new, added = insert_rows(conn, encoded, self._rows_per_insert)
            ids[:] = new
            return len(new) - gone, added - freed

        # what needs no room made and fits one INSERT is one statement: a window of one's every commit,
        # and a burst's (its ~500 rows: one step, which holds the fsync too, instead of six)
        single = self._when_full == "block" and len(encoded) <= self._rows_per_insert
        with self._write_lock:
            self._write("appending", body, one_statement=single)
            self._dropped.update(dropped)
        return ids

    def take_dropped(self) -> dict[str, int]:
        """Records ``drop_oldest`` deleted since the last call, per route."""
        with self._write_lock:
            taken, self._dropped = dict(self._dropped), Counter()
        return taken

    def delete(self, ids: Iterable[int], sizes: Sequence[int] | None = None) -> None:
        """Delete the rows ``ids`` in one transaction (ids no longer there are ignored). ``sizes``,
        when given, are their row sizes as read: then the delete is a single statement (one step,
        see ``gateway.spool.steps``) instead of a count, a delete and a commit. Only ``drop_oldest`` removes rows
        behind the sender's back; should a row be gone all the same, the totals are counted again."""
        wanted = [int(i) for i in ids]
        if not wanted:
            return
        single = (sizes is not None and len(sizes) == len(wanted) and not self.drops_oldest
                  and len(wanted) <= self._max_parameters)

        def body(conn: sqlite3.Connection) -> tuple[int, int]:
            if single:
                assert sizes is not None
                gone = delete_rows(conn, wanted)
                if gone != len(wanted):
                    self._resync = True
                return -gone, -sum(sizes)
            count, freed = delete_counted(conn, wanted, self._max_parameters)
            return -count, -freed

        with self._write_lock:
            self._write("deleting delivered records", body, one_statement=single)
            self._deletes_since_vacuum += len(wanted)
            if self._deletes_since_vacuum >= 10_000 or self._records == 0:
                self._deletes_since_vacuum = 0
                self._shrink()

    def replace(self, delete: Iterable[int], add: Sequence[SpoolRow]) -> list[int]:
        """Delete ``delete`` and append ``add`` in one transaction (a record becomes its dead
        letter's envelope). The capacity is not enforced here: the envelope replaces its record."""
        wanted = [int(i) for i in delete]
        ids: list[int] = []

        def body(conn: sqlite3.Connection) -> tuple[int, int]:
            count, freed = delete_counted(conn, wanted, self._max_parameters)
            new, added = insert_rows(conn, [encode(row) for row in add], self._rows_per_insert)
            ids[:] = new
            return len(new) - count, added - freed

        with self._write_lock:
            self._write("replacing a record by its dead letter", body)
        return ids

    def _shrink(self) -> None:
        """Give free pages back to the file system once they are many and most of the file: after a
        long outage has drained, the file shrinks back instead of keeping its peak size."""
        conn = self._writer
        if conn is None:
            return
        try:
            free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
            if free >= _VACUUM_PAGES and free * 2 >= pages:
                conn.execute(f"PRAGMA incremental_vacuum({_VACUUM_PAGES})").fetchall()
        except sqlite3.Error:
            pass  # only housekeeping: the next delete tries again

    # -- reading ------------------------------------------------------------------------------------

    def read(self, after_id: int, max_records: int, max_bytes: int) -> list[SpooledRecord]:
        """Rows with id > ``after_id`` in id order: at most ``max_records``, and at most ``max_bytes``
        (counted by row size) unless the first row alone is bigger. Undecodable rows are deleted."""
        with self._read_lock:
            conn = self._reader
            if conn is None:
                return []
            try:
                found = read_batches(conn, after_id, max(1, max_records), max_bytes)
                if found is None:   # something in there does not decode as a whole: row by row
                    found = read_rows(conn, after_id, max(1, max_records), max_bytes)
            except sqlite3.Error as exc:
                raise unavailable(self.directory, exc, "reading the spool") from None
        out, bad = found
        if bad:
            def body(conn: sqlite3.Connection) -> tuple[int, int]:
                count, freed = delete_counted(conn, bad, self._max_parameters)
                return -count, -freed

            with self._write_lock:
                self._write("deleting undecodable records", body)
                self._undecodable += len(bad)
        return out

    @property
    def records(self) -> int:
        return self._records

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def undecodable(self) -> int:
        return self._undecodable

    @property
    def commits(self) -> int:
        return self._commits

    def oldest_arrival_ms(self) -> int | None:
        """The arrival time of the oldest record (the lowest id), or None for an empty spool."""
        with self._read_lock:
            if self._reader is None:
                return None
            try:
                row = self._reader.execute("SELECT arrival_ms FROM records ORDER BY id LIMIT 1").fetchone()
            except sqlite3.Error:
                return None
        return row[0] if row and isinstance(row[0], int) else None

    def breakdown(self) -> list[tuple[str, str, int, int]]:
        """(stream, route, records, bytes) for each stream and route in the spool (a full scan)."""
        with self._read_lock:
            if self._reader is None:
                return []
            rows = self._reader.execute(
                f"SELECT stream, route, count(*), total({SIZE_SQL}) FROM records"
                " GROUP BY stream, route ORDER BY stream, route").fetchall()
        return [(str(s), str(r), int(n), int(b)) for s, r, n, b in rows]

    def close(self) -> None:
        """Close the connections (the last close checkpoints the WAL) and release the lock."""
        with self._write_lock, self._read_lock:
            self._close_connections()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
