"""The heap freeze: start-up objects leave the collector's view, and a reload's leftovers do not leak."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from collections.abc import Iterator

import pytest

from gateway.ops.memory import freeze_heap, refreeze_heap


class _Node:
    """Something that can sit in a reference cycle, as parts of a route table may."""

    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_freezing_moves_what_is_alive_out_of_the_collected_generations() -> None:
    freeze_heap()
    assert gc.get_freeze_count() > 0


def test_a_cycle_dropped_after_the_freeze_is_collected_by_refreezing() -> None:
    dropped = _cycle_frozen_then_dropped()
    gc.collect()
    assert dropped() is not None      # frozen: an ordinary collection leaves it alone
    refreeze_heap()
    assert dropped() is None          # what a reload does: unfreeze, collect, freeze again
    assert gc.get_freeze_count() > 0


def _cycle_frozen_then_dropped() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    freeze_heap()                     # alive now, as a route table is until a reload replaces it
    ref = weakref.ref(a)
    del a, b
    return ref


def test_without_a_spool_the_running_gateway_imports_neither_sqlite3_nor_asyncio() -> None:
    """What `run` keeps out of the process without a spool (docs/performance.md#memory): sqlite3
    (about 1.0 MB) and asyncio (about 1.5 MB); jsonschema runs in a child process. The listener
    (gateway.ops.http) is imported as it is with HTTP_PORT set."""
    script = ("import sys, gateway.cli, gateway.app, gateway.ops.http\n"
              "print(sorted(m for m in ('sqlite3', 'asyncio', 'jsonschema', 'concurrent') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
