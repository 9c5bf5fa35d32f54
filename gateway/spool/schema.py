"""The spool's on-disk format: one SQLite table, its pragmas, how a row is encoded and checked, and
how an engine error becomes a one-line ``SpoolUnavailable``.

Why SQLite: a commit in WAL mode with ``synchronous=FULL`` is durable against power loss when it
returns, readers never block the writer, and ``PRAGMA quick_check`` is a cheap start-up check — an
engine made for this rather than a home-made file format (docs/spool.md).

Invariants owned here:
- a row is stored with a CRC-32 over every field, so a row whose bytes changed on disk is told
  apart from a good one (``decode`` returns None for it, as for a row of the wrong types);
- a row's ``size`` (what counts against the spool's capacity) is computed in one place;
- every engine or OS error maps to one of three codes, ``disk_full``, ``read_only``, ``io_error``
  (plus ``in_use`` for a spool another process holds), with a message on one line.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import zlib
from functools import partial
from typing import Any, Final, NamedTuple

__all__ = [
    "COLUMNS", "DB_NAME", "SCHEMA_VERSION", "SIZE_SQL", "SpoolRow", "SpoolUnavailable", "SpooledRecord",
    "Undecodable", "configure", "create_schema", "decode", "encode", "row_size", "schema_problem", "unavailable",
]

DB_NAME: Final = "spool.db"
SCHEMA_VERSION: Final = 1
ROW_OVERHEAD: Final = 48  # the id, the integers and SQLite's cell header, roughly

COLUMNS: Final = ("id", "route", "stream", "partition_key", "explicit_hash_key", "arrival_ms", "data",
                  "topic", "dead_letter", "is_dead_letter", "size", "checksum")

# the size a row counts for, even when its column holds the wrong type (then 0)
SIZE_SQL: Final = "CASE WHEN typeof(size) = 'integer' AND size >= 0 THEN size ELSE 0 END"


_DDL: Final = """
CREATE TABLE records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    route TEXT, stream TEXT, partition_key TEXT, explicit_hash_key TEXT, arrival_ms INTEGER,
    data BLOB, topic TEXT, dead_letter TEXT, is_dead_letter INTEGER, size INTEGER, checksum INTEGER
)"""


class SpoolRow(NamedTuple):
    """What is written: one record as routed, with what its dead letter needs later."""

    route: str                 # route name at routing time
    stream: str                # stream name or ARN the record is for
    partition_key: str
    explicit_hash_key: str | None
    arrival_ms: int            # Message.received_ms
    data: bytes
    topic: str                 # MQTT topic (for a dead-letter envelope later)
    dead_letter: str | None    # "kinesis:<stream>", "mqtt:<topic>" or None
    is_dead_letter: bool       # this row IS a dead-letter envelope (its own failure is a drop)


class SpooledRecord(NamedTuple):
    """What is read back: ``id`` increases with every append, so id order is arrival order."""

    id: int
    row: SpoolRow
    size: int                  # bytes counted against capacity for this row


class SpoolUnavailable(Exception):
    """The spool cannot be written: disk full, read-only, I/O error, or held by another process.

    ``str(e)`` is one line; ``code`` is ``disk_full`` | ``read_only`` | ``io_error`` | ``in_use``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(" ".join(message.split()))
        self.code = code


def row_size(row: SpoolRow) -> int:
    """Bytes a row counts against the spool's capacity: its data, its text fields, an overhead."""
    # the UTF-8 length of the texts joined is the sum of their UTF-8 lengths: one measurement, not six
    text = (row.route + row.stream + row.partition_key + (row.explicit_hash_key or "") + row.topic
            + (row.dead_letter or ""))
    return len(row.data) + (len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))) + ROW_OVERHEAD


def _checksum(route: str, stream: str, key: str, hash_key: str | None, arrival_ms: int, data: bytes,
              topic: str, dead_letter: str | None, is_dead_letter: int, size: int) -> int:
    # the fields joined by NUL, None as \x01 and a value as \x02 + value; encoded once (UTF-8 of a join
    # is the join of the UTF-8s, so this is the byte string every spool's checksums were made over)
    head = "\x00".join((route, stream, key, "\x01" if hash_key is None else "\x02" + hash_key, str(arrival_ms),
                        topic, "\x01" if dead_letter is None else "\x02" + dead_letter,
                        "1" if is_dead_letter else "0", str(size))).encode("utf-8", "surrogatepass")
    return zlib.crc32(data, zlib.crc32(head))


def encode(row: SpoolRow, size: int | None = None) -> tuple[Any, ...]:
    """The INSERT parameters for ``row`` (every column but the id); ``size`` is its ``row_size``,
    when the caller has it already."""
    if size is None:
        size = row_size(row)
    flag = 1 if row.is_dead_letter else 0
    return (row.route, row.stream, row.partition_key, row.explicit_hash_key, row.arrival_ms, row.data,
            row.topic, row.dead_letter, flag, size,
            _checksum(row.route, row.stream, row.partition_key, row.explicit_hash_key, row.arrival_ms,
                      row.data, row.topic, row.dead_letter, flag, size))


_new_row = partial(tuple.__new__, SpoolRow)          # without the namedtuples' Python-level __new__
_new_spooled = partial(tuple.__new__, SpooledRecord)


def decode(values: tuple[Any, ...] | list[Any]) -> SpooledRecord | None:
    """The record a SELECT of ``COLUMNS`` returned, or None when its types or checksum are wrong."""
    if len(values) != len(COLUMNS):
        return None
    rid, route, stream, key, hash_key, arrival, data, topic, dead_letter, flag, size, crc = values
    # exact types: a TEXT that is not UTF-8 comes back as Undecodable (a bytes), never as str or data
    texts_ok = type(route) is str and type(stream) is str and type(key) is str and type(topic) is str
    optional_ok = (hash_key is None or type(hash_key) is str) and (dead_letter is None or type(dead_letter) is str)
    ints_ok = type(rid) is int and type(arrival) is int and type(size) is int and type(crc) is int and flag in (0, 1)
    if not (texts_ok and optional_ok and ints_ok and type(data) is bytes):
        return None
    try:
        if crc != _checksum(route, stream, key, hash_key, arrival, data, topic, dead_letter, flag, size):
            return None
    except UnicodeEncodeError:
        return None
    return _new_spooled((rid, _new_row((route, stream, key, hash_key, arrival, data, topic, dead_letter,
                                        flag == 1)), size))


# -- the engine -------------------------------------------------------------------------------------

class Undecodable(bytes):
    """A TEXT value that is not UTF-8: a damaged row, told apart by ``decode``, never raised."""


def text_factory(value: bytes) -> str | Undecodable:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return Undecodable(value)


def configure(conn: sqlite3.Connection) -> None:
    """The durability settings: WAL, a commit fsynced before it returns, a WAL file trimmed back to
    4 MiB after each checkpoint (one every ~1000 pages, SQLite's default)."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if not mode or str(mode[0]).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot switch the spool to WAL mode (journal_mode={mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA wal_autocheckpoint=1000")
    conn.execute("PRAGMA journal_size_limit=4194304")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.text_factory = text_factory


def create_schema(conn: sqlite3.Connection) -> None:
    """A fresh spool: incremental auto-vacuum (set before the first table), the table, the version."""
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_DDL)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def schema_problem(conn: sqlite3.Connection) -> str | None:
    """What is wrong with the spool's schema, or None. An empty database is reported as ``empty``."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if version == 0 and not tables:
        return "empty"
    if version != SCHEMA_VERSION:
        return f"schema version {version}, expected {SCHEMA_VERSION}"
    if "records" not in tables:
        return "no records table"
    columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(records)"))
    if columns != COLUMNS:
        return f"records table has columns {', '.join(columns) or 'none'}"
    return None


_WORDS: Final = {"disk_full": "disk full", "read_only": "read-only", "io_error": "I/O error", "in_use": "in use"}


def _probe(directory: str) -> str:
    """Tell a full or read-only file system from another I/O error by looking at it."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return "io_error"
    if stat.f_flag & os.ST_RDONLY:
        return "read_only"
    if stat.f_bavail * stat.f_frsize < 256 * 1024:
        return "disk_full"
    return "io_error"


def unavailable(directory: str, exc: BaseException, doing: str) -> SpoolUnavailable:
    """The one-line ``SpoolUnavailable`` for ``exc``, raised while ``doing`` something to the spool."""
    if isinstance(exc, SpoolUnavailable):
        return exc
    code = "io_error"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            code = "disk_full"
        elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            code = "read_only"
        detail = exc.strerror or str(exc)
    else:
        name = str(getattr(exc, "sqlite_errorname", "") or "")
        if name.startswith("SQLITE_FULL"):
            code = "disk_full"
        elif name.startswith("SQLITE_READONLY"):
            code = "read_only"
        else:
            code = _probe(directory)
        detail = f"{exc}" + (f" ({name})" if name else "")
    return SpoolUnavailable(code, f"spool {directory}: {_WORDS[code]} while {doing}: {detail}")
