"""The spool on a real small file system: a full disk and a read-only remount raise SpoolUnavailable
with the right code, leave the spool intact, and appends work again once there is room / it is
writable again. The test mounts its own tmpfs (it needs root; skipped only if mount is refused)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.spool import SpoolRow, SpoolStore, SpoolUnavailable
from gateway.spool.check import examine

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "mnt"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    done = _run("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount))
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs refused: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        _run("mount", "-o", "remount,rw", str(mount))
        result = _run("umount", str(mount))
        assert result.returncode == 0, result.stderr


def _row(n: int, size: int = 40_000) -> SpoolRow:
    return SpoolRow("r", "s", f"k{n}", None, n, bytes([n % 251]) * size, "t", None, False)


def _fill(store: SpoolStore) -> tuple[list[int], SpoolUnavailable]:
    ids: list[int] = []
    for n in range(1000):
        try:
            ids += store.append([_row(n), _row(n + 10_000)])
        except SpoolUnavailable as exc:
            return ids, exc
    raise AssertionError("a 4 MiB file system never filled up")


def _all(store: SpoolStore) -> list[int]:
    out, after = [], 0
    while batch := store.read(after, 100, 10**7):
        out += [r.id for r in batch]
        after = batch[-1].id
    return out


def test_a_full_disk_is_disk_full_keeps_every_committed_row_and_recovers(small_disk: Path) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 1024 * 1024)
    store, report = SpoolStore.open(str(small_disk / "spool"), max_bytes=10**9)
    try:
        ids, error = _fill(store)
        assert error.code == "disk_full", error
        assert "\n" not in str(error) and "disk full" in str(error)
        assert ids and store.records == len(ids) and _all(store) == ids
        with pytest.raises(SpoolUnavailable) as again:  # still full: still refused, nothing written
            store.append([_row(1)])
        assert again.value.code == "disk_full" and store.records == len(ids)
        filler.unlink()  # room again
        more = store.append([_row(2)])
        assert _all(store) == ids + more and store.records == len(ids) + 1
    finally:
        store.close()
    assert examine(str(small_disk / "spool")).problem is None
    reopened, report = SpoolStore.open(str(small_disk / "spool"), max_bytes=10**9)
    try:
        assert report.quarantined_to is None and reopened.records == len(ids) + 1, report.summary
    finally:
        reopened.close()


def test_a_full_disk_at_start_raises_spool_unavailable_not_damage(small_disk: Path) -> None:
    filler = small_disk / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    with pytest.raises(SpoolUnavailable) as caught:
        SpoolStore.open(str(small_disk / "spool"), max_bytes=10**6)
    assert caught.value.code == "disk_full", caught.value
    filler.unlink()
    store, report = SpoolStore.open(str(small_disk / "spool"), max_bytes=10**6)
    store.close()
    assert report.quarantined_to is None and not list((small_disk / "spool").glob("spool-damaged-*"))


def test_a_read_only_volume_is_read_only_moves_nothing_and_recovers_when_writable(
        small_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The kernel refuses `remount,ro` while a file is open for writing (EBUSY), so the store is closed
    # first: what a gateway meets when it (re)opens its spool on a volume that went read-only.
    directory = small_disk / "spool"
    store, _ = SpoolStore.open(str(directory), max_bytes=10**9)
    ids = store.append([_row(1, 100), _row(2, 100)])
    store.close()
    assert _run("mount", "-o", "remount,ro", str(small_disk)).returncode == 0
    with pytest.raises(SpoolUnavailable) as caught:
        SpoolStore.open(str(directory), max_bytes=10**9)
    assert caught.value.code == "read_only", caught.value
    assert "\n" not in str(caught.value)
    assert not list(directory.glob("spool-damaged-*"))
    assert main(["spool", "check", str(directory)]) == 0  # the tools still read it
    assert "engine check ok" in capsys.readouterr().out
    assert _run("mount", "-o", "remount,rw", str(small_disk)).returncode == 0
    store, report = SpoolStore.open(str(directory), max_bytes=10**9)
    try:
        assert report.quarantined_to is None and store.records == 2
        more = store.append([_row(3, 100)])
        assert _all(store) == ids + more
    finally:
        store.close()
