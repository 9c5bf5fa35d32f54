"""`spool inspect DIR` and `spool check DIR`: exit codes like `validate`, and neither changes the
spool (read-only), also while a store has it open."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.spool import SpoolRow, SpoolStore

pytestmark = pytest.mark.timeout(60)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def fingerprint(directory: Path) -> dict[str, str]:
    """The database and its WAL (the -shm file is SQLite's shared index, which readers use too)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in directory.iterdir() if p.name in ("spool.db", "spool.db-wal") and p.stat().st_size}


def filled(path: Path) -> SpoolStore:
    store, _ = SpoolStore.open(str(path), max_bytes=10**7)
    store.append([SpoolRow("telemetry", "stream-a", "k", None, 1_000, b"x" * 100, "t", None, False)] * 3
                 + [SpoolRow("alarms", "stream-b", "k", None, 2_000, b"y" * 10, "t", None, False)])
    return store


def test_inspect_counts_per_stream_and_route_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    filled(tmp_path).close()
    code, out, err = run(capsys, "spool", "inspect", tmp_path)
    assert code == 0, err
    assert "engine check ok" in out and "records 4," in out and "oldest record's age" in out
    lines = [line.split() for line in out.splitlines()]
    assert lines[-2][:3] == ["stream-a", "telemetry", "3"] and lines[-1][:3] == ["stream-b", "alarms", "1"]


def test_inspect_and_check_work_next_to_an_open_store_and_change_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = filled(tmp_path)
    try:
        before = fingerprint(tmp_path)
        assert run(capsys, "spool", "inspect", tmp_path)[0] == 0
        assert run(capsys, "spool", "check", tmp_path)[0] == 0
        assert fingerprint(tmp_path) == before
        store.append([SpoolRow("r", "s", "k", None, 1, b"more", "t", None, False)])  # the store is undisturbed
        assert store.records == 5
    finally:
        store.close()


def test_a_damaged_spool_exits_1_and_is_left_where_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    filled(tmp_path).close()
    with (tmp_path / "spool.db").open("r+b") as handle:
        handle.seek(4096)
        handle.write(b"\xff" * 4096)
    before = fingerprint(tmp_path)
    for command in ("inspect", "check"):
        code, out, err = run(capsys, "spool", command, tmp_path)
        assert code == 1 and "damaged" in err and len(err.splitlines()) == 1, err
    assert fingerprint(tmp_path) == before and not list(tmp_path.glob("spool-damaged-*"))


def test_check_says_only_the_engine_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    filled(tmp_path).close()
    code, out, err = run(capsys, "spool", "check", tmp_path)
    assert (code, out.strip(), err) == (0, f"{tmp_path}: engine check ok", "")


def test_no_spool_or_no_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "spool", "inspect", tmp_path / "missing")[0] == 2
    code, _, err = run(capsys, "spool", "check", tmp_path)
    assert code == 2 and "no spool here" in err
    assert run(capsys, "spool")[0] == 2


def test_quarantined_spools_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "spool.db").write_bytes(b"not a database at all" * 300)
    SpoolStore.open(str(tmp_path), max_bytes=1000)[0].close()
    code, out, _ = run(capsys, "spool", "inspect", tmp_path)
    assert code == 0 and "kept for inspection: spool-damaged-" in out and "records 0," in out
    shutil.rmtree(next(tmp_path.glob("spool-damaged-*")))
