"""SpoolStore: what is appended is read back in order, deleted once, counted right, also after a
restart; the capacity policies; rows that do not decode."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.spool import SpoolFull, SpoolRow, SpoolStore, SpoolUnavailable
from gateway.spool.schema import row_size
from gateway.spool.steps import read_batches, read_rows

pytestmark = pytest.mark.timeout(60)


def row(n: int, route: str = "r1", data: bytes | None = None, **changes: object) -> SpoolRow:
    base = SpoolRow(route, "stream-a", f"key-{n}", None, 1_000 + n, data if data is not None else b"p%d" % n,
                    f"t/{n}", "kinesis:dlq", False)
    return base._replace(**changes)  # type: ignore[arg-type]


def open_store(path: Path, max_bytes: int = 10_000_000, when_full: str = "block") -> SpoolStore:
    store, report = SpoolStore.open(str(path), max_bytes=max_bytes, when_full=when_full)
    assert "\n" not in report.summary
    return store


@pytest.fixture
def spool(tmp_path: Path):
    store = open_store(tmp_path / "spool")
    yield store
    store.close()


def test_a_new_directory_gets_a_fresh_spool(tmp_path: Path) -> None:
    store, report = SpoolStore.open(str(tmp_path / "a" / "b"), max_bytes=1000)
    try:
        assert report.fresh and report.quarantined_to is None and report.problem is None
        assert (report.records, report.bytes, store.records, store.bytes) == (0, 0, 0, 0)
        assert "fresh" in report.summary
    finally:
        store.close()


def test_rows_are_read_back_whole_and_in_append_order(spool: SpoolStore) -> None:
    rows = [row(1, explicit_hash_key="123"), row(2, dead_letter=None, is_dead_letter=True),
            row(3, data=b"\x00\xff" * 50, partition_key="ключ")]
    ids = spool.append(rows[:2]) + spool.append(rows[2:])
    assert ids == sorted(ids) and len(set(ids)) == 3
    got = spool.read(0, 100, 10**6)
    assert [r.id for r in got] == ids
    assert [r.row for r in got] == rows
    assert [r.size for r in got] == [row_size(r) for r in rows]
    assert spool.read(ids[0], 100, 10**6)[0].id == ids[1]


def test_read_stops_at_the_record_and_byte_limits_but_always_returns_one(spool: SpoolStore) -> None:
    ids = spool.append([row(i, data=b"x" * 100) for i in range(10)])
    assert len(spool.read(0, 3, 10**6)) == 3
    one = row_size(row(0, data=b"x" * 100))
    assert [r.id for r in spool.read(0, 100, 2 * one + 1)] == ids[:2]
    assert [r.id for r in spool.read(0, 100, 1)] == ids[:1]
    assert spool.read(ids[-1], 100, 10**6) == []


def test_totals_follow_appends_deletes_and_replaces(spool: SpoolStore) -> None:
    rows = [row(i) for i in range(5)]
    ids = spool.append(rows)
    assert (spool.records, spool.bytes) == (5, sum(map(row_size, rows)))
    spool.delete(ids[:2] + [999_999])  # an id no longer there is ignored
    assert (spool.records, spool.bytes) == (3, sum(map(row_size, rows[2:])))
    envelope = row(9, data=b"e" * 300, is_dead_letter=True, dead_letter=None)
    new = spool.replace(delete=[ids[2]], add=[envelope])
    assert new[0] > ids[-1]
    assert (spool.records, spool.bytes) == (3, sum(map(row_size, rows[3:])) + row_size(envelope))
    assert [r.row for r in spool.read(0, 10, 10**6)] == rows[3:] + [envelope]
    assert spool.commits == 3


def test_ids_keep_growing_after_the_spool_was_emptied_and_reopened(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    first = store.append([row(1), row(2)])
    store.delete(first)
    store.close()
    store = open_store(tmp_path)
    try:
        assert store.append([row(3)])[0] > first[-1]
    finally:
        store.close()


def test_a_restart_keeps_the_rows_and_recounts_the_totals(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    rows = [row(i, data=b"d" * i) for i in range(50)]
    ids = store.append(rows)
    store.delete(ids[:10])
    records, size = store.records, store.bytes
    store.close()
    store, report = SpoolStore.open(str(tmp_path), max_bytes=10**7)
    try:
        assert not report.fresh and report.problem is None
        assert (report.records, report.bytes, store.records, store.bytes) == (records, size, 40, size)
        assert [r.row for r in store.read(0, 100, 10**7)] == rows[10:]
        assert store.oldest_arrival_ms() == rows[10].arrival_ms
        assert "40 records" in report.summary
    finally:
        store.close()


def test_a_second_process_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    try:
        with pytest.raises(SpoolUnavailable) as caught:
            SpoolStore.open(str(tmp_path), max_bytes=1000)
        assert caught.value.code == "in_use"
    finally:
        store.close()
    open_store(tmp_path).close()


def test_block_refuses_what_does_not_fit_and_writes_nothing(tmp_path: Path) -> None:
    one = row_size(row(0))
    store = open_store(tmp_path, max_bytes=3 * one)
    try:
        store.append([row(0), row(1)])
        with pytest.raises(SpoolFull, match="full"):
            store.append([row(2), row(3)])
        assert store.records == 2 and len(store.read(0, 10, 10**6)) == 2
        store.append([row(2)])
        assert store.bytes == 3 * one
    finally:
        store.close()


def test_drop_oldest_keeps_the_newest_and_counts_each_dropped_record_per_route(tmp_path: Path) -> None:
    one = row_size(row(10))
    store = open_store(tmp_path, max_bytes=10 * one, when_full="drop_oldest")
    try:
        store.append([row(10 + i, route="ra" if i % 2 else "rb") for i in range(10)])
        assert store.take_dropped() == {}
        store.append([row(20 + i, route="rc") for i in range(3)])
        assert store.take_dropped() == {"rb": 2, "ra": 1}
        assert store.take_dropped() == {}
        kept = store.read(0, 100, 10**6)
        assert [r.row.arrival_ms for r in kept] == [1_000 + n for n in range(13, 23)]
        assert (store.records, store.bytes) == (10, 10 * one)
        store.append([row(30 + i, route="rd") for i in range(1000)][:10])  # a whole spool's worth
        assert store.take_dropped() == {"ra": 4, "rb": 3, "rc": 3}
    finally:
        store.close()


def test_rows_bigger_than_the_whole_spool_are_refused_under_either_policy(tmp_path: Path) -> None:
    for policy in ("block", "drop_oldest"):
        store = open_store(tmp_path / policy, max_bytes=100, when_full=policy)
        try:
            with pytest.raises(SpoolFull):
                store.append([row(1, data=b"x" * 200)])
            assert store.records == 0
        finally:
            store.close()


def damaged_spool(path: Path, rows: int, damage: dict[int, str]) -> tuple[SpoolStore, list[int]]:
    """A spool of ``rows`` rows, reopened after ``damage`` (row index -> an UPDATE's SET clause) was
    written to its file behind its back."""
    store = open_store(path)
    ids = store.append([row(i) for i in range(rows)])
    store.close()
    conn = sqlite3.connect(path / "spool.db")
    for index, change in damage.items():
        conn.execute(f"UPDATE records SET {change} WHERE id = ?", (ids[index],))
    conn.commit()
    conn.close()
    return open_store(path), ids


def test_a_row_that_cannot_be_decoded_is_skipped_counted_and_deleted(tmp_path: Path) -> None:
    store, ids = damaged_spool(tmp_path, 4, {1: "data = 42",          # wrong type
                                             2: "data = x'00'",       # changed bytes
                                             3: "size = 'big'"})      # wrong type
    try:
        assert store.records == 4
        got = store.read(0, 100, 10**6)
        assert [r.id for r in got] == [ids[0]]
        assert store.undecodable == 3 and store.records == 1 and store.bytes == got[0].size
        assert store.read(0, 100, 10**6) == got
    finally:
        store.close()


def test_a_batch_read_returns_what_a_row_by_row_read_returns_at_every_limit(spool: SpoolStore) -> None:
    rows = [row(i, data=bytes(range(256)) * (i % 3), partition_key=f"ключ-{i}") for i in range(40)]
    spool.append(rows)
    conn = spool._reader
    assert conn is not None
    one = row_size(rows[1])
    for after, records, n_bytes in [(0, 100, 10**6), (5, 7, 10**6), (0, 100, 3 * one), (0, 100, 1), (39, 5, 10**6)]:
        batched = read_batches(conn, after, records, n_bytes)
        assert batched is not None
        assert batched == read_rows(conn, after, records, n_bytes), (after, records, n_bytes)
    assert [r.row for r in spool.read(0, 100, 10**7)] == rows


def test_text_that_is_not_utf8_is_told_apart_row_by_row_and_the_rest_still_reads(tmp_path: Path) -> None:
    store, ids = damaged_spool(tmp_path, 5, {1: "topic = CAST(x'ff00fe' AS TEXT)",   # not UTF-8
                                             3: "stream = x'0102'",                  # a BLOB
                                             4: "data = 'text'"})                    # a TEXT
    try:
        got = store.read(0, 100, 10**6)
        assert [r.id for r in got] == [ids[0], ids[2]]
        assert store.undecodable == 3 and store.records == 2
        assert store.read(0, 100, 10**6) == got
    finally:
        store.close()


def test_a_delete_given_the_sizes_keeps_the_totals_and_recounts_when_a_row_was_gone(spool: SpoolStore) -> None:
    rows = [row(i, data=b"y" * i) for i in range(6)]
    ids = spool.append(rows)
    sizes = [row_size(r) for r in rows]
    spool.delete(ids[:2], sizes[:2])
    assert (spool.records, spool.bytes) == (4, sum(sizes[2:]))
    spool.delete([ids[2], 999_999], [sizes[2], 77])     # one id no longer there: counted again
    spool.append([row(9)])
    assert (spool.records, spool.bytes) == (4, sum(sizes[3:]) + row_size(row(9)))


def test_threads_appending_and_draining_at_once_lose_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    delivered: list[int] = []
    done = threading.Event()

    def sender() -> None:
        after = 0
        while not (done.is_set() and store.records == 0):
            batch = store.read(after, 50, 10**6)
            if batch:
                after = batch[-1].id
                delivered.extend(r.row.arrival_ms for r in batch)
                store.delete(r.id for r in batch)

    thread = threading.Thread(target=sender)
    thread.start()
    for start in range(0, 1000, 20):
        store.append([row(i) for i in range(start, start + 20)])
    done.set()
    thread.join(30)
    try:
        assert delivered == [1_000 + i for i in range(1000)]
        assert (store.records, store.bytes) == (0, 0)
    finally:
        store.close()


def test_a_bad_policy_or_capacity_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="when_full"):
        SpoolStore.open(str(tmp_path), max_bytes=10, when_full="drop_newest")
    with pytest.raises(ValueError, match="max_bytes"):
        SpoolStore.open(str(tmp_path), max_bytes=0)


def test_the_file_shrinks_back_after_a_large_backlog_drained(tmp_path: Path) -> None:
    store = open_store(tmp_path, max_bytes=10**9)
    try:
        for _ in range(10):
            ids = store.append([row(i, data=b"z" * 10_000) for i in range(200)])
            store.delete(ids)
        db = tmp_path / "spool.db"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.close()
        assert pages * 4096 < 10 * 1024 * 1024  # 20 MB went through; the file holds far less
    finally:
        store.close()
