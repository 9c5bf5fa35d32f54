"""The spool's start-up: its lock, its check, moving a damaged spool aside, and the line that reports it.

Why: a spool damaged by a power loss, a bad disk or a stray write must never stop the gateway from
starting, nor make it loop at start-up; it is kept for inspection (a damaged file is moved aside,
never repaired in place) and the gateway starts on a fresh one.

Invariants owned here:
- the check opens the database read-only (``mode=ro``): checking never changes the files, so what
  is moved aside is what was found, and ``spool inspect``/``spool check`` can run next to a gateway;
- the check runs once, and each step is bounded: no retry, no repair loop;
- an environmental failure (disk full, read-only, locked, I/O) is not damage: it raises
  ``SpoolUnavailable`` and moves nothing;
- a quarantine moves the database and its ``-wal`` and ``-shm`` files together into one new
  directory ``spool-damaged-<UTC time>`` inside the spool directory.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote

from gateway.spool.schema import DB_NAME, SpoolUnavailable, schema_problem, text_factory, unavailable

__all__ = ["Examination", "OpenReport", "connect_ro", "count_rows", "examine", "lock_spool", "open_report",
           "quarantine", "wal_header_problem"]

SIDE_FILES: Final = ("-wal", "-shm")
_ENVIRONMENTAL: Final = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_BUSY", "SQLITE_LOCKED",
                         "SQLITE_IOERR", "SQLITE_PERM", "SQLITE_NOMEM")
_WAL_MAGIC: Final = (0x377F0682, 0x377F0683)


@dataclass(frozen=True)
class Examination:
    """What the check found: ``problem`` None means the spool is good (or absent, or empty)."""

    exists: bool               # a database file (or a leftover -wal) is there
    problem: str | None        # one line: what is wrong
    records: int | None        # rows counted (a good spool), or what a damaged one still lets count
    engine: str                # the engine check's result: "ok", "not run", or quick_check's first line


@dataclass(frozen=True)
class OpenReport:
    """What ``SpoolStore.open`` found; the caller logs ``summary`` as one line."""

    fresh: bool                   # a new spool was created
    quarantined_to: str | None    # where the damaged spool was moved (kept for inspection)
    problem: str | None           # what was found
    records: int                  # records in the spool now
    bytes: int
    lost_estimate: int | None     # records the quarantined spool may hold (None: unknown)
    summary: str


def lock_spool(directory: str) -> int:
    """Take ``spool.lock`` (an exclusive ``flock``): one process per spool, the next one is refused."""
    path = os.path.join(directory, "spool.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise unavailable(directory, exc, "opening the spool's lock file") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SpoolUnavailable("in_use", f"spool {directory}: in use by another process (spool.lock is held)"
                               ) from None
    return fd


def open_report(directory: str, records: int, n_bytes: int, capacity: int, *, fresh: bool, moved_to: str | None,
                problem: str | None, lost: int | None) -> OpenReport:
    """The one line a start says about its spool: created, checked ok, or damaged and moved aside."""
    where = f"spool {directory}"
    now = f"{records} records, {n_bytes} bytes of {capacity}"
    if moved_to is not None:
        size = sum(p.stat().st_size for p in Path(moved_to).iterdir())
        may_hold = f"it may hold {lost} records" if lost is not None else "how many records it holds is unknown"
        summary = (f"{where}: damaged ({problem}); moved to {moved_to} ({size} bytes, {may_hold});"
                   " started a fresh spool")
    elif fresh:
        summary = f"{where}: created a fresh spool ({now})"
    else:
        summary = f"{where}: checked ok; {now} to deliver first"
    return OpenReport(fresh, moved_to, problem, records, n_bytes, lost, summary)


def _first_line(text: object) -> str:
    return " ".join(str(text).split())[:200]


def wal_header_problem(wal: Path) -> str | None:
    """A WAL whose header is damaged is silently ignored by SQLite (its commits with it): say so."""
    try:
        size = wal.stat().st_size
        if size == 0:
            return None
        with wal.open("rb") as handle:
            header = handle.read(32)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"WAL file unreadable: {exc.strerror or exc}"
    if len(header) < 32:
        return f"WAL file truncated to {size} bytes"
    magic, _version, page_size = struct.unpack(">III", header[:12])
    if magic not in _WAL_MAGIC:
        return "WAL file header damaged (bad magic number)"
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return f"WAL file header damaged (page size {page_size})"
    big_endian = magic & 1
    s1 = s2 = 0
    words = struct.unpack((">" if big_endian else "<") + "6I", header[:24])
    for i in range(0, 6, 2):
        s1 = (s1 + words[i] + s2) & 0xFFFFFFFF
        s2 = (s2 + words[i + 1] + s1) & 0xFFFFFFFF
    if (s1, s2) != struct.unpack(">II", header[24:32]):
        return "WAL file header damaged (bad checksum)"
    return None


def _is_environmental(exc: sqlite3.Error) -> bool:
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    return name.startswith(_ENVIRONMENTAL) and name != "SQLITE_IOERR_SHORT_READ"


def connect_ro(db: Path) -> sqlite3.Connection:
    """A read-only connection: it never writes the database or its WAL, and never checkpoints."""
    uri = f"file:{quote(db.as_posix())}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        conn.close()
        if not isinstance(exc, sqlite3.OperationalError) or Path(str(db) + "-wal").exists():
            raise
        # a read-only directory where no -shm can be made: nothing else writes it, read it as is
        conn = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False)
    conn.text_factory = text_factory
    return conn


def count_rows(db: Path) -> int | None:
    """How many records a (possibly damaged) spool still lets count, or None when it does not."""
    try:
        conn = connect_ro(db)
    except sqlite3.Error:
        return None
    try:
        return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])
    except sqlite3.Error:
        return _salvage_count(conn)
    finally:
        conn.close()


def _salvage_count(conn: sqlite3.Connection) -> int | None:
    """Rows readable from either end of a damaged table, up to the damage: a lower bound."""
    total, read_any = 0, False
    for order in ("ASC", "DESC"):
        try:
            for _ in conn.execute(f"SELECT id FROM records ORDER BY id {order}"):
                total, read_any = total + 1, True
            return total  # no damage met on this side: every row was counted
        except sqlite3.Error:
            continue
    return total if read_any else None


def examine(directory: str, *, count: bool = False) -> Examination:
    """Check the spool in ``directory`` read-only: the WAL's header, ``PRAGMA quick_check``, the
    schema. Raises ``SpoolUnavailable`` for an environmental failure, never for damage."""
    db = Path(directory) / DB_NAME
    wal = Path(str(db) + "-wal")
    if not db.exists():
        leftover = wal.exists() and wal.stat().st_size > 0
        return Examination(leftover, "a WAL file without its database" if leftover else None, 0, "not run")
    header = wal_header_problem(wal)
    if header is not None:
        return Examination(True, header, count_rows(db), "not run")
    try:
        if db.stat().st_size == 0 and not wal.exists():
            return Examination(True, None, 0, "ok")
        conn = connect_ro(db)
    except OSError as exc:
        raise unavailable(directory, exc, "opening the spool") from None
    except sqlite3.Error as exc:
        if _is_environmental(exc):
            raise unavailable(directory, exc, "opening the spool") from None
        return Examination(True, _first_line(exc), None, "not run")
    try:
        try:
            results = [str(r[0]) for r in conn.execute("PRAGMA quick_check(20)").fetchall()]
        except sqlite3.Error as exc:
            if _is_environmental(exc):
                raise unavailable(directory, exc, "checking the spool") from None
            return Examination(True, _first_line(exc), None, _first_line(exc))
        if results != ["ok"]:
            more = f" (and {len(results) - 1} more)" if len(results) > 1 else ""
            found = _first_line(results[0].replace("*** in database main ***", "")) + more
            return Examination(True, f"quick_check: {found}", None, found)
        try:
            problem = schema_problem(conn)
            rows = (int(conn.execute("SELECT count(*) FROM records").fetchone()[0])
                    if problem is None and count else None)
        except sqlite3.Error as exc:
            if _is_environmental(exc):
                raise unavailable(directory, exc, "checking the spool") from None
            return Examination(True, _first_line(exc), None, "ok")
        if problem == "empty":
            return Examination(True, None, 0, "ok")
        return Examination(True, problem, rows, "ok")
    finally:
        conn.close()


def quarantine(directory: str, now: float) -> str:
    """Move the spool's files into a new ``spool-damaged-<UTC time>`` directory; return its path.
    Raises ``SpoolUnavailable`` when they cannot be moved (they stay where they were)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    base = Path(directory) / f"spool-damaged-{stamp}"
    target, n = base, 1
    while target.exists():
        target, n = Path(f"{base}-{n}"), n + 1
    try:
        target.mkdir()
        for suffix in ("", *SIDE_FILES):
            source = Path(directory) / (DB_NAME + suffix)
            if source.exists():
                os.rename(source, target / source.name)
        _fsync_dir(directory)
    except OSError as exc:
        raise unavailable(directory, exc, "moving a damaged spool aside") from None
    return str(target)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
