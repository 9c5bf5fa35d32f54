"""The heap freeze: start-up objects leave the collector's view, and a reload's leftovers do not leak."""

from __future__ import annotations

import gc
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
