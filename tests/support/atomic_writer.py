"""Kubelet's AtomicWriter, step by step, so reload tests see the filesystem a ConfigMap volume sees.

Follows ``pkg/volume/util/atomic_writer.go`` (kubernetes/kubernetes): the visible files are
symlinks ``name -> ..data/name``; ``..data`` is a symlink to a hidden timestamped directory holding
the real files. An update never touches a visible file: it writes a new timestamped directory,
points a ``..data_tmp`` symlink at it, renames that over ``..data`` (the one atomic step), then
removes stale visible links and the old directory. ``steps`` yields after each step so a test can
look at the directory in between.
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["STEPS", "AtomicWriter"]

DATA_DIR = "..data"
NEW_DATA_DIR = "..data_tmp"

STEPS = (
    "timestamped-dir-created",
    "payload-written",
    "data-tmp-symlinked",
    "data-renamed",
    "visible-links-created",
    "stale-links-removed",
    "old-dir-removed",
)


class AtomicWriter:
    """Projects ``{name: bytes}`` into ``target_dir`` exactly as the kubelet does."""

    def __init__(self, target_dir: str | os.PathLike[str], mode: int = 0o644) -> None:
        self.target = Path(target_dir)
        self.target.mkdir(parents=True, exist_ok=True)
        self.mode = mode

    def write(self, payload: Mapping[str, bytes]) -> bool:
        """Run every step; False when the kubelet would skip the update (nothing changed)."""
        done = list(self.steps(payload))  # run to the end: the generator does the work
        return bool(done)

    def steps(self, payload: Mapping[str, bytes]) -> Iterator[str]:
        """Yield the name of each step after doing it. Yields nothing for a no-op update."""
        data_link = self.target / DATA_DIR
        old_ts = os.readlink(data_link) if data_link.is_symlink() else ""
        stale = self._paths_to_remove(payload)
        if old_ts and not stale and not self._should_write(payload, self.target / old_ts):
            return

        ts_dir = self._new_timestamped_dir()
        yield "timestamped-dir-created"

        for name, content in payload.items():
            path = ts_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            os.chmod(path, self.mode)
        yield "payload-written"

        tmp_link = self.target / NEW_DATA_DIR
        os.symlink(ts_dir.name, tmp_link)  # relative, as the kubelet does
        yield "data-tmp-symlinked"

        os.rename(tmp_link, data_link)  # rename(2) over the old symlink: the atomic step
        yield "data-renamed"

        for name in payload:
            visible = self.target / name.split("/")[0]
            if not os.path.lexists(visible):
                os.symlink(f"{DATA_DIR}/{name.split('/')[0]}", visible)
        yield "visible-links-created"

        for name in sorted(stale, reverse=True):
            os.remove(self.target / name)
        yield "stale-links-removed"

        if old_ts:
            shutil.rmtree(self.target / old_ts)
        yield "old-dir-removed"

    def _new_timestamped_dir(self) -> Path:
        # Go: os.MkdirTemp(dir, time.Now().UTC().Format("..2006_01_02_15_04_05.")): the pattern
        # plus a random numeric suffix, e.g. ..2026_11_30_04_00_00.123456789
        stamp = _dt.datetime.now(_dt.UTC).strftime("..%Y_%m_%d_%H_%M_%S.")
        while True:
            path = self.target / f"{stamp}{random.randrange(10**9):09d}"
            try:
                path.mkdir()
            except FileExistsError:
                continue
            os.chmod(path, 0o755)
            return path

    def _paths_to_remove(self, payload: Mapping[str, bytes]) -> set[str]:
        wanted = {name.split("/")[0] for name in payload}
        return {entry.name for entry in self.target.iterdir()
                if not entry.name.startswith("..") and entry.name not in wanted}

    @staticmethod
    def _should_write(payload: Mapping[str, bytes], old_dir: Path) -> bool:
        for name, content in payload.items():
            path = old_dir / name
            if not path.exists() or path.read_bytes() != content:
                return True
        return False
