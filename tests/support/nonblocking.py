"""Run a call that must not block, without letting a regression hang the test run."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest


def finishes_without_blocking(work: Callable[[], Any], unblock: Callable[[], None], what: str) -> Any:
    """``work()``'s result; if it is still running after 30 s, ``unblock()`` and fail naming ``what``."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(work()), daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        unblock()
        thread.join(5)
        pytest.fail(f"{what} blocked")
    return box[0]
