"""Handing freed memory back to the system, so RSS follows what the gateway holds, and keeping the
cycle collector off what lives as long as the process.

Why: a burst of large messages (long topics, big payloads) is freed once Kinesis holds it, but
glibc keeps the freed pages of its heaps for reuse, so RSS would stay at the burst's peak for as
long as the process lives; against a container memory limit that reads as a leak. ``malloc_trim``
returns every free page of every arena. It is glibc's; elsewhere this does nothing.

Why freeze: a full collection looks at every object alive, and most of them (modules, the route
table, clients) were made at start-up and live until exit. Frozen, they are no longer looked at:
in a QoS 1 burst of 100,000 messages the collector's time went from 0.36-0.45 s (three runs) to
0.16 s (one run), and with the spool from 0.80-0.87 s (two runs) to 0.38 s (docs/performance.md).
Frozen objects are still freed when nothing refers to them; only a cycle among them would stay, so
a reload, which drops a whole route table, unfreezes, collects and freezes again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

__all__ = ["freeze_heap", "memory_trimmer", "refreeze_heap"]

_M_MMAP_THRESHOLD = -3          # mallopt's parameter number in glibc's malloc.h
_MMAP_THRESHOLD_BYTES = 32 * 1024

log = logging.getLogger(__name__)


def memory_trimmer() -> Callable[[], None]:
    """Tune the allocator for a long-running process, and return a callable that hands free heap
    pages back to the system (a no-op without glibc)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        log.debug("malloc_trim is not available; freed memory stays with the allocator")
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    # Blocks of 32 KiB and more (long topics, large payloads, socket reads) get pages of their own,
    # returned the moment they are freed; glibc would otherwise raise this threshold as the process
    # frees large blocks and keep them in its heaps.
    mallopt = ctypes.CDLL(name).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)

    def release() -> None:
        trim(0)

    return release


def freeze_heap() -> None:
    """Collect once, then keep everything alive now out of every later collection (gc.freeze)."""
    gc.collect()
    gc.freeze()


def refreeze_heap() -> None:
    """After something long-lived was replaced (a route table): collect what it left in cycles, and
    freeze what is alive now."""
    gc.unfreeze()
    freeze_heap()
