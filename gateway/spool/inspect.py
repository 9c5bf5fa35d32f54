"""``mqtt-kinesis-gateway spool inspect DIR`` and ``spool check DIR``: what a spool holds and whether
the engine finds it sound, told without changing it.

Why: an operator looking at a stuck or damaged spool must be able to ask what is in it while the
gateway runs, and a check must never be the thing that changes the evidence.

Invariants owned here:
- the spool is opened read-only (``mode=ro``), never locked, never quarantined, never repaired:
  running either command next to a gateway is safe;
- exit codes are ``validate``'s: 0 sound, 1 damaged (findings), 2 no spool there or unreadable.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from gateway.spool.check import connect_ro, examine
from gateway.spool.schema import DB_NAME, SIZE_SQL, SpoolUnavailable

__all__ = ["EXIT_DAMAGED", "EXIT_OK", "EXIT_UNREADABLE", "Inspection", "inspect_spool", "write_report"]

EXIT_OK: Final = 0
EXIT_DAMAGED: Final = 1
EXIT_UNREADABLE: Final = 2


@dataclass(frozen=True)
class Inspection:
    """What ``inspect_spool`` found; ``exit_code`` follows from it."""

    directory: str
    unreadable: str | None          # no spool there, or it cannot be read at all
    problem: str | None             # the damage found
    engine: str                     # quick_check's result, or "not run"
    records: int = 0
    bytes: int = 0
    oldest_age_seconds: float | None = None
    breakdown: tuple[tuple[str, str, int, int], ...] = ()   # (stream, route, records, bytes)
    quarantined: tuple[str, ...] = ()                      # spool-damaged-* directories kept here

    @property
    def exit_code(self) -> int:
        if self.unreadable is not None:
            return EXIT_UNREADABLE
        return EXIT_DAMAGED if self.problem is not None else EXIT_OK


def inspect_spool(directory: str, *, contents: bool = True, now: float | None = None) -> Inspection:
    """Check the spool in ``directory`` read-only; with ``contents``, count what it holds too."""
    path = Path(directory)
    if not path.is_dir():
        return Inspection(directory, f"{directory}: no such directory", None, "not run")
    quarantined = tuple(sorted(p.name for p in path.glob("spool-damaged-*") if p.is_dir()))
    if not (path / DB_NAME).exists() and not (path / (DB_NAME + "-wal")).exists():
        return Inspection(directory, f"{directory}: no spool here (no {DB_NAME})", None, "not run",
                          quarantined=quarantined)
    try:
        found = examine(directory)
    except SpoolUnavailable as exc:
        return Inspection(directory, str(exc), None, "not run", quarantined=quarantined)
    if found.problem is not None or not contents:
        return Inspection(directory, None, found.problem, found.engine, quarantined=quarantined)
    try:
        conn = connect_ro(path / DB_NAME)
        try:
            rows = conn.execute(f"SELECT stream, route, count(*), total({SIZE_SQL}) FROM records"
                                " GROUP BY stream, route ORDER BY stream, route").fetchall()
            first = conn.execute("SELECT arrival_ms FROM records ORDER BY id LIMIT 1").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Inspection(directory, None, " ".join(str(exc).split()), found.engine, quarantined=quarantined)
    breakdown = tuple((str(s), str(r), int(n), int(b)) for s, r, n, b in rows)
    oldest = None
    if first is not None and isinstance(first[0], int):
        oldest = max(0.0, (time.time() if now is None else now) - first[0] / 1000)
    return Inspection(directory, None, None, found.engine, sum(b[2] for b in breakdown),
                      sum(b[3] for b in breakdown), oldest, breakdown, quarantined)


def write_report(found: Inspection, out: TextIO, err: TextIO, *, contents: bool = True) -> None:
    """The text report: findings and problems on ``err`` as ``DIR: ...`` lines, contents on ``out``."""
    if found.unreadable is not None:
        err.write(f"{found.unreadable}\n")
        return
    if found.problem is not None:
        err.write(f"{found.directory}: damaged: {found.problem} (the gateway moves it aside at its next start)\n")
    else:
        out.write(f"{found.directory}: engine check {found.engine}\n")
    for name in found.quarantined:
        out.write(f"{found.directory}: kept for inspection: {name}\n")
    if not contents or found.problem is not None:
        return
    age = "none (empty)" if found.oldest_age_seconds is None else f"{found.oldest_age_seconds:.1f} s"
    out.write(f"records {found.records}, bytes {found.bytes}, oldest record's age {age}\n")
    if found.breakdown:
        width = max(6, *(len(b[0]) for b in found.breakdown))
        rwidth = max(5, *(len(b[1]) for b in found.breakdown))
        out.write(f"{'stream':<{width}}  {'route':<{rwidth}}  {'records':>9}  {'bytes':>12}\n")
        for stream, route, records, size in found.breakdown:
            out.write(f"{stream:<{width}}  {route:<{rwidth}}  {records:>9}  {size:>12}\n")
