"""How the loop's connection ends on a stop: DISCONNECT, half-close, and wait for the broker's close.

Why: a broker handles a connection's packets in order and closes it on DISCONNECT, so once it has
closed, it has read every PUBACK sent before. Closing at once instead can lose them: with unread
bytes in our receive buffer the close is a reset, which discards what still waits in the broker's,
and a process that connects next under the same client id may take the session over before the
broker reads them. Either way the broker redelivers what was acked (docs/delivery.md#shutdown).

paho closes its socket as soon as DISCONNECT is written, so the wait runs on a duplicate of the
connection's file descriptor. It uses real time: it bounds a stop, it is no policy of the loop.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

__all__ = ["closing_copy", "wait_for_broker_close"]


def closing_copy(sock: Any) -> socket.socket | None:
    """A second handle on the connection, so that it outlives paho's close of its own."""
    try:
        return socket.socket(fileno=os.dup(sock.fileno()))
    except (OSError, ValueError):
        return None


def wait_for_broker_close(sock: socket.socket, timeout: float) -> None:
    """Half-close, then read (and discard) until the broker closes its side, or `timeout` s."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return
    except OSError:      # reset, timed out, or already gone: nothing more to wait for
        return
    finally:
        sock.close()
