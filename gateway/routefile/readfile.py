"""Reading a route file: a regular file under a size limit, read once, without ever blocking.

Why a module of its own: the route file is a path an operator (or a ConfigMap, or a mistake)
controls, and reading it naively goes wrong in ways that take the gateway down. A symlink to
``/dev/zero`` reads until memory runs out; a FIFO blocks ``open`` until a writer appears, which
froze the reload thread for good; a huge file takes minutes and gigabytes to load.

Invariant: ``read_route_file`` returns the bytes of a regular file of at most ``limit`` bytes, or
raises ``RouteFileError`` with a one-line reason; it never blocks on the file's kind and never reads
more than ``limit + 1`` bytes. The kind and the size are taken from the descriptor it reads
(``fstat``), so a file swapped between a check and the read cannot slip past. See
docs/route-file.md#limits.
"""

from __future__ import annotations

import os
import stat
from typing import Final

__all__ = ["MAX_ROUTE_FILE_BYTES", "RouteFileError", "read_route_file"]

MAX_ROUTE_FILE_BYTES: Final = 16 * 1024 * 1024
"""16 MiB: sixteen times what a Kubernetes ConfigMap can hold, about 200,000 routes."""

_CHUNK = 1 << 20


class RouteFileError(Exception):
    """The file cannot be used as a route file; ``message`` is one line without the file name.

    ``fingerprint`` identifies what was found when the path exists but is refused (its device,
    inode, kind, size and modification time), so a reloader can report it once, not on every rescan;
    it is empty when the path could not be opened at all (missing, no permission), which may pass.
    """

    def __init__(self, message: str, fingerprint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fingerprint = fingerprint


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "an unknown kind of file"


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.0f} MiB" if size >= 1024 * 1024 else f"{size} bytes"


def read_route_file(path: str | os.PathLike[str], limit: int = MAX_ROUTE_FILE_BYTES) -> bytes:
    """The bytes of the regular file at ``path`` (symlinks followed), at most ``limit`` of them."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
    except OSError as exc:
        raise RouteFileError(f"cannot read the file: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        fingerprint = f"{info.st_dev}:{info.st_ino}:{info.st_mode}:{info.st_size}:{info.st_mtime_ns}"
        if not stat.S_ISREG(info.st_mode):
            raise RouteFileError(f"{_kind(info.st_mode)}, not a regular file", fingerprint)
        too_big = f"a route file is at most {_mib(limit)}"
        if info.st_size > limit:
            raise RouteFileError(f"the file is {_mib(info.st_size)} ({info.st_size} bytes): {too_big}", fingerprint)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # the file may grow after fstat: read one byte past the limit at most
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise RouteFileError(f"the file grew past the limit while it was read: {too_big}", fingerprint)
        return b"".join(chunks)
    except OSError as exc:
        raise RouteFileError(f"cannot read the file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
