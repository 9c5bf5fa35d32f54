"""A damaged spool never stops the gateway: whatever was done to its files, open() returns a usable
store and one line saying what it found, never raises, never loops (the timeout guards that).

The random cases truncate and overwrite the files of a spool copied while it was open (as a crash
leaves it: database, WAL and shared-memory file). Set SPOOL_DAMAGE_SEED to replay a run; the seed
is printed and named in every failure.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from gateway.spool import SpoolRow, SpoolStore

pytestmark = pytest.mark.timeout(60)

SEED = int(os.environ.get("SPOOL_DAMAGE_SEED") or random.SystemRandom().randrange(1, 2**31))
CASES = 60
FILES = ("spool.db", "spool.db-wal")


def setup_module() -> None:
    print(f"\nspool damage cases: SPOOL_DAMAGE_SEED={SEED}")


def _row(n: int, rng: random.Random) -> SpoolRow:
    return SpoolRow(f"route-{n % 3}", "stream-a", f"key-{n}", None, 1_000 + n, rng.randbytes(rng.randrange(1, 3000)),
                    f"t/{n}", None, False)


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spool as a crash leaves it: rows in the database file and in the WAL, files copied while open."""
    rng = random.Random(1)
    live = tmp_path_factory.mktemp("live")
    store, _ = SpoolStore.open(str(live), max_bytes=10**8)
    ids: list[int] = []
    for tx in range(30):
        ids += store.append([_row(tx * 10 + i, rng) for i in range(10)])
        if tx == 15:
            assert store._writer is not None
            store._writer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    store.delete(ids[:25])
    image = tmp_path_factory.mktemp("image")
    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        shutil.copyfile(live / name, image / name)
    store.close()
    assert (image / "spool.db-wal").stat().st_size > 0
    return image


def _open_and_use(directory: Path, case: str) -> None:
    store, report = SpoolStore.open(str(directory), max_bytes=10**8)
    try:
        assert report.summary and "\n" not in report.summary, case
        if report.quarantined_to is not None:
            assert report.fresh and report.problem, case
            moved = Path(report.quarantined_to)
            assert moved.parent == directory and moved.name.startswith("spool-damaged-"), case
            assert (moved / "spool.db").exists() or (moved / "spool.db-wal").exists(), case
        seen = 0
        after = 0
        while batch := store.read(after, 100, 10**7):  # every row left either decodes or is deleted
            seen += len(batch)
            after = batch[-1].id
        assert seen == store.records, case
        new = store.append([SpoolRow("r", "s", "k", None, 1, b"after", "t", None, False)])
        assert store.read(new[0] - 1, 10, 10**6)[0].row.data == b"after", case
    finally:
        store.close()
    again, second = SpoolStore.open(str(directory), max_bytes=10**8)  # what it left opens clean
    again.close()
    assert second.quarantined_to is None, f"{case}: a second open quarantined again: {second.summary}"


@pytest.mark.parametrize("case", range(CASES))
def test_a_randomly_damaged_spool_opens_with_one_line_and_stays_usable(case: int, crashed: Path,
                                                                        tmp_path: Path) -> None:
    rng = random.Random(f"{SEED}-{case}")
    directory = tmp_path / "spool"
    shutil.copytree(crashed, directory)
    done = []
    for _ in range(rng.choice((1, 1, 2))):
        target = directory / rng.choice(FILES)
        size = target.stat().st_size
        if rng.random() < 0.4:
            offset = rng.randrange(0, size + 1)
            os.truncate(target, offset)
            done.append(f"{target.name} truncated to {offset} of {size}")
        else:
            offset = rng.randrange(0, max(1, size))
            length = rng.choice((1, 8, 100, 4096, 20000))
            with target.open("r+b") as handle:
                handle.seek(offset)
                handle.write(rng.randbytes(length))
            done.append(f"{target.name}: {length} random bytes at {offset} of {size}")
    _open_and_use(directory, f"SPOOL_DAMAGE_SEED={SEED} case {case}: {'; '.join(done)}")


def _other_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, payload BLOB)")
    conn.execute("INSERT INTO records (payload) VALUES (x'00')")
    conn.commit()
    conn.close()


def _newer_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=7")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("damage, found", [
    (lambda d: (d / "spool.db").write_bytes(b"hello, I am not a database" * 100), "quick_check"),
    (lambda d: [(d / n).unlink() for n in FILES[1:] + ("spool.db-shm",)]
     + [(d / "spool.db").write_bytes(os.urandom(100_000))], "not a database"),
    (lambda d: os.truncate(d / "spool.db", 50), ""),
    (lambda d: os.truncate(d / "spool.db", 4096 * 3 + 17), ""),
    (lambda d: (d / "spool.db-wal").write_bytes(os.urandom(50_000)), "WAL"),
    (lambda d: os.truncate(d / "spool.db-wal", 20), "WAL"),
    (lambda d: (d / "spool.db-shm").write_bytes(os.urandom(32768)), None),
    (lambda d: ((d / "spool.db").unlink(), (d / "spool.db-shm").unlink()), "WAL file without its database"),
    (lambda d: [(d / n).unlink() for n in (*FILES, "spool.db-shm")] + [_other_database(d / "spool.db")],
     "schema version 0"),
    (lambda d: [(d / n).unlink() for n in FILES] + [_newer_schema(d / "spool.db")], "schema version 7"),
], ids=["text", "random-db", "truncated-header", "truncated-mid-page", "random-wal", "truncated-wal-header",
        "random-shm", "wal-without-db", "foreign-table", "newer-schema"])
def test_each_kind_of_damage_is_named_in_the_summary(damage, found: str | None, crashed: Path,
                                                      tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    shutil.copytree(crashed, directory)
    damage(directory)
    store, report = SpoolStore.open(str(directory), max_bytes=10**8)
    store.close()
    if found is None:  # SQLite rebuilds a shared-memory file: nothing was lost
        assert report.quarantined_to is None and report.records == 275, report.summary
    else:
        assert report.quarantined_to is not None and found in report.summary, report.summary
        assert "damaged" in report.summary and "moved to" in report.summary
    _open_and_use(directory, report.summary)


def test_the_summary_says_how_many_records_a_quarantined_spool_may_hold(crashed: Path, tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    shutil.copytree(crashed, directory)
    for name in ("spool.db-wal", "spool.db-shm"):
        (directory / name).unlink()  # the rows checkpointed into the database remain
    conn = sqlite3.connect(directory / "spool.db")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    count = conn.execute("SELECT count(*) FROM records").fetchone()[0]
    conn.close()
    store, report = SpoolStore.open(str(directory), max_bytes=10**8)
    store.close()
    assert report.lost_estimate == count > 0
    assert f"may hold {count} records" in report.summary


def test_an_empty_database_file_is_a_fresh_spool_not_damage(tmp_path: Path) -> None:
    (tmp_path / "spool.db").write_bytes(b"")
    store, report = SpoolStore.open(str(tmp_path), max_bytes=1000)
    store.close()
    assert report.fresh and report.quarantined_to is None and report.problem is None


def test_two_quarantines_in_the_same_second_get_two_directories(tmp_path: Path) -> None:
    for _ in range(2):
        (tmp_path / "spool.db").write_bytes(b"garbage" * 1000)
        store, report = SpoolStore.open(str(tmp_path), max_bytes=1000, clock=lambda: 1_700_000_000.0)
        store.close()
        assert report.quarantined_to is not None
    assert sorted(p.name for p in tmp_path.glob("spool-damaged-*")) == [
        "spool-damaged-20231114T221320Z", "spool-damaged-20231114T221320Z-1"]
