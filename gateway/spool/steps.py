"""The spool's statements: rows in and out of SQLite in as few engine steps as possible.

Why: Python's ``sqlite3`` gives up the GIL for every step of a statement and then waits to take it
back from the busy MQTT thread, so each step can cost milliseconds while messages arrive. Beside two
busy threads a 460-row append took 138 ms as BEGIN, four INSERTs and COMMIT, 19 ms as one statement;
500 rows read row by row took 3.3 s, 16 ms as one statement (docs/spool.md, "Commits").

Invariants owned here:
- an INSERT, a DELETE or a batch read never binds more parameters than the connection allows;
- a batch read returns exactly what a row-by-row read returns (the same rows, the same bad ids), or
  None when its batch does not decode as a whole; then ``read_rows`` tells each bad row apart;
- ``make_room`` deletes the oldest rows only, and counts each one it deleted against its route.
"""

from __future__ import annotations

import functools
import sqlite3
from collections import Counter
from collections.abc import Sequence
from itertools import chain
from operator import itemgetter
from typing import Any, Final

import orjson

from gateway.spool.schema import COLUMNS, SIZE_SQL, SpooledRecord, decode

__all__ = ["MAX_ROWS_PER_INSERT", "decode_batch", "delete_counted", "delete_rows", "insert_rows", "make_room",
           "max_parameters", "read_batches", "read_rows", "rows_per_insert"]

MAX_ROWS_PER_INSERT: Final = 2000       # and fewer where SQLite allows fewer parameters
_DROP_CHUNK: Final = 500                # rows looked at per step when making room for drop_oldest
_READ_ROWS: Final = 1000                # rows per batch read: one JSON text in memory
_READ_BYTES: Final = 4 * 1024 * 1024    # ...and row bytes per batch (its hex is twice that)
_DATA: Final = COLUMNS.index("data")
_SIZE: Final = COLUMNS.index("size") - 1   # in ``encode``'s parameters, which have no id
_SELECT: Final = f"SELECT {', '.join(COLUMNS)} FROM records"
_by_id = itemgetter(0)

# One statement, one step: the rows after an id, at most a count and (but for the first) a byte
# total, as one JSON array built inside SQLite, the data in hex. A value of the wrong type stays one
# that ``decode`` refuses (a data that is not a BLOB becomes null).
_BATCH_READ: Final = f"""
SELECT CAST(json_group_array(json_array({', '.join(c if c != 'data' else
    "CASE WHEN typeof(data) = 'blob' THEN hex(data) END" for c in COLUMNS)})) AS BLOB)
FROM (SELECT *, row_number() OVER win AS n, sum({SIZE_SQL}) OVER win AS running
      FROM (SELECT * FROM records WHERE id > ? ORDER BY id LIMIT ?) WINDOW win AS (ORDER BY id))
WHERE n = 1 OR running <= ?"""


def rows_per_insert(conn: sqlite3.Connection) -> int:
    """How many rows one INSERT may carry on ``conn`` (each row binds every column but the id)."""
    return max(1, min(MAX_ROWS_PER_INSERT, max_parameters(conn) // (len(COLUMNS) - 1)))


def max_parameters(conn: sqlite3.Connection) -> int:
    return max(1, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))


@functools.lru_cache(maxsize=256)
def _insert_sql(rows: int) -> str:
    """One INSERT of ``rows`` rows, built once per row count (a window of one commits one row each
    time, and does not build its SQL again each time)."""
    marks = f"({', '.join('?' * (len(COLUMNS) - 1))})"
    return f"INSERT INTO records ({', '.join(COLUMNS[1:])}) VALUES {', '.join([marks] * rows)}"


def insert_rows(conn: sqlite3.Connection, encoded: Sequence[tuple[Any, ...]], per_statement: int
                ) -> tuple[list[int], int]:
    """Insert ``encode``d rows, ``per_statement`` to an INSERT (not executemany: a step per row);
    return their ids in order and their bytes. Runs inside the caller's transaction, or alone."""
    if not encoded:
        return [], 0
    last = 0
    for start in range(0, len(encoded), per_statement):
        chunk = encoded[start:start + per_statement]
        last = conn.execute(_insert_sql(len(chunk)), list(chain.from_iterable(chunk))).lastrowid or 0
    # AUTOINCREMENT, one writer, one transaction: the rows took the ids up to the last one, in order
    return list(range(last - len(encoded) + 1, last + 1)), sum(params[_SIZE] for params in encoded)


def delete_counted(conn: sqlite3.Connection, ids: Sequence[int], per_statement: int) -> tuple[int, int]:
    """Delete ``ids`` (those no longer there are ignored); return the rows and bytes deleted. Two
    steps per chunk, a count and a delete (RETURNING would step once per row)."""
    count = freed = 0
    for start in range(0, len(ids), per_statement):
        chunk = ids[start:start + per_statement]
        marks = ", ".join("?" * len(chunk))
        found, size = conn.execute(f"SELECT count(*), total({SIZE_SQL}) FROM records WHERE id IN ({marks})",
                                   chunk).fetchone()
        conn.execute(f"DELETE FROM records WHERE id IN ({marks})", chunk)
        count, freed = count + int(found), freed + int(size)
    return count, freed


def delete_rows(conn: sqlite3.Connection, ids: Sequence[int]) -> int:
    """Delete ``ids`` in one statement (at most ``max_parameters`` of them); return how many went."""
    return conn.execute(f"DELETE FROM records WHERE id IN ({', '.join('?' * len(ids))})", ids).rowcount


def make_room(conn: sqlite3.Connection, excess: int, dropped: Counter[str]) -> tuple[int, int]:
    """Delete the oldest rows until at least ``excess`` bytes are freed (or the spool is empty);
    count each deleted row against its route in ``dropped``; return the rows and bytes deleted."""
    freed = count = 0
    while freed < excess:
        batch = conn.execute(f"SELECT id, route, {SIZE_SQL} FROM records ORDER BY id LIMIT {_DROP_CHUNK}").fetchall()
        last = None
        for rid, route, size in batch:
            if freed >= excess:
                break
            last, freed, count = rid, freed + int(size), count + 1
            dropped[route if isinstance(route, str) else "?"] += 1
        if last is None:
            break
        conn.execute("DELETE FROM records WHERE id <= ?", (last,))
    return count, freed


def read_batches(conn: sqlite3.Connection, after_id: int, max_records: int,
                 max_bytes: int) -> tuple[list[SpooledRecord], list[int]] | None:
    """The rows after ``after_id`` (see ``SpoolStore.read``) as (records, ids that do not decode),
    one statement per batch; None when a batch does not decode as a whole (a text that is not
    UTF-8, a BLOB where a text belongs) or SQLite refuses to build it."""
    out: list[SpooledRecord] = []
    bad: list[int] = []
    total = 0
    while len(out) < max_records:
        limit = min(_READ_BYTES, max_bytes - total)
        if out and limit <= 0:
            break
        try:
            value = conn.execute(_BATCH_READ, (after_id, min(_READ_ROWS, max_records - len(out)), limit)).fetchone()
        except sqlite3.Error:   # e.g. "JSON cannot hold BLOB values": the row-by-row read tells a bad
            return None         # row apart, or raises what is wrong with the spool
        decoded = decode_batch(value[0] if value else None)
        if decoded is None:
            return None
        records, skipped = decoded
        bad += skipped
        for record in records:
            if out and total + record.size > max_bytes:
                return out, bad
            out.append(record)
            total += record.size
        if not records and not skipped:
            break
        after_id = max(records[-1].id if records else 0, skipped[-1] if skipped else 0)
    return out, bad


def decode_batch(blob: Any) -> tuple[list[SpooledRecord], list[int]] | None:
    """A batch read's value as (records in id order, ids of rows that do not decode), or None when
    it is not the JSON that statement makes (text that is not UTF-8, say)."""
    if not isinstance(blob, bytes):
        return None
    try:
        batch = orjson.loads(blob)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(batch, list):
        return None
    records: list[SpooledRecord] = []
    bad: list[int] = []
    for values in batch:
        if not isinstance(values, list) or len(values) != len(COLUMNS) or type(values[0]) is not int:
            return None
        hexed = values[_DATA]
        if type(hexed) is str:
            try:
                values[_DATA] = bytes.fromhex(hexed)
            except ValueError:
                return None
        record = decode(values)
        if record is None:
            bad.append(values[0])
        else:
            records.append(record)
    records.sort(key=_by_id)   # in id order already (the rows' order in the statement); made sure of
    bad.sort()
    return records, bad


def read_rows(conn: sqlite3.Connection, after_id: int, max_records: int,
              max_bytes: int) -> tuple[list[SpooledRecord], list[int]]:
    """What ``read_batches`` returns, stepped row by row: slow beside busy threads, but each bad row
    is told apart."""
    out: list[SpooledRecord] = []
    bad: list[int] = []
    total = 0
    cursor = conn.execute(f"{_SELECT} WHERE id > ? ORDER BY id LIMIT ?", (after_id, max_records))
    for values in cursor:
        record = decode(tuple(values))
        if record is None:
            bad.append(int(values[0]))
            continue
        if out and total + record.size > max_bytes:
            break
        out.append(record)
        total += record.size
    cursor.close()
    return out, bad
