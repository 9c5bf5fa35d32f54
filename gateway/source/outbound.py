"""What other threads ask the MQTT network loop to send: acks, publishes, and wake-ups.

Invariant owned here: **no thread but the loop's ever touches the paho client.** The ack tracker
(on sink threads) and the pipeline (dead letters to MQTT topics, a full backlog that has room
again) only put work here; the loop drains it with `take()` and makes the paho calls itself. So no
component needs a reference to the source, and the source needs no lock around paho.

Wake-ups are rationed, because at low rates a wake-up costs more than the message it carries
(docs/performance.md#what-gets-it-there):
- at most one wake byte per drain, however many items arrive before the loop takes them;
- none while the loop is awake (between `take()` and its next `sleeping()`): `sleeping()` then
  reports the queued work and the loop does not wait;
- an ack does not wake a loop whose next round is due within its `patience` (the read interval):
  the ack rides that round. A publish or an explicit `wake()` always wakes it.

Every method is quick and never blocks: `ack_many` runs under the ack tracker's lock, and nothing here
calls back into the caller.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Outbound", "Publish", "Taken"]


@dataclass(frozen=True, slots=True)
class Publish:
    """One message to publish; `done(ok, reason)` runs on the loop thread once the broker
    acknowledged it (QoS 1), it was written (QoS 0), or paho refused it."""

    topic: str
    payload: bytes
    qos: int
    done: Callable[[bool, str], None]


class Taken(NamedTuple):
    """Everything queued since the previous `take()`, in the order it was queued."""

    acks: list[tuple[int, int]]
    publishes: list[Publish]


_NOTHING = Taken([], [])


class Outbound:
    """Thread-safe mailbox of the MQTT loop, with a socket that is readable when there is news."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._acks: list[tuple[int, int]] = []
        self._publishes: list[Publish] = []
        self._news = False               # a wake() since the last take()
        self._due: float | None = None   # when the sleeping loop looks anyway; None: it is awake
        self._patience = 0.0
        self._wake_sent = False          # a wake byte was claimed since the last take()
        self._unread = 0                 # wake bytes claimed and not yet read back
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- any thread ------------------------------------------------------------------------------

    def ack(self, mid: int, qos: int) -> None:
        """Queue the ack of packet `mid`."""
        self.ack_many([(mid, qos)])

    def ack_many(self, acks: list[tuple[int, int]]) -> None:
        """Queue acks, (mid, qos) each, in order (the ack tracker calls this when it releases acks)."""
        with self._lock:
            self._acks.extend(acks)
            if self._due is None or self._wake_sent or self._due - self._clock() <= self._patience:
                return
            self._wake_sent = True
            self._unread += 1
        self._send_wake_byte()

    def publish(self, topic: str, payload: bytes, qos: int, done: Callable[[bool, str], None]) -> None:
        """Queue a publish; `done(ok, reason)` is told the outcome, on the loop thread."""
        with self._lock:
            self._publishes.append(Publish(topic, payload, qos, done))
            if not self._claim_wake():
                return
        self._send_wake_byte()

    def wake(self) -> None:
        """Make the loop run a round now (the backlog has room, subscriptions changed, stop)."""
        with self._lock:
            self._news = True
            if not self._claim_wake():
                return
        self._send_wake_byte()

    # -- the loop thread -------------------------------------------------------------------------

    def fileno(self) -> int:
        """Readable while a wake byte waits; the loop includes it in every wait."""
        return self._wake_r.fileno()

    def sleeping(self, timeout: float, patience: float) -> bool:
        """The loop is about to wait up to `timeout` s; acks may wait `patience` s for it.

        Returns True instead if work is already queued: then the loop must not wait.
        """
        with self._lock:
            if self._acks or self._publishes or self._news:
                return True
            self._due = self._clock() + timeout
            self._patience = patience
            return False

    def take(self) -> Taken:
        """Drain everything queued; the loop is awake from now until its next `sleeping()`."""
        with self._lock:
            self._due = None
            self._news = False
            self._wake_sent = False
            unread = self._unread
            if self._acks or self._publishes:
                taken = Taken(self._acks, self._publishes)
                self._acks, self._publishes = [], []
            else:
                taken = _NOTHING
        if unread:   # a byte claimed just before this take() may still be on its way: keep count
            try:
                read = len(self._wake_r.recv(4096))
            except (BlockingIOError, InterruptedError):
                read = 0
            with self._lock:
                self._unread = max(0, self._unread - read)
        return taken

    def drop_acks(self) -> int:
        """The connection changed: acks queued for the old one must never go out on the new one
        (docs/delivery.md#acks-and-ordering). Returns how many were dropped."""
        with self._lock:
            dropped = len(self._acks)
            self._acks = []
            return dropped

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    # -- helpers ---------------------------------------------------------------------------------

    def _claim_wake(self) -> bool:
        """Lock held: whether this caller must send the wake byte."""
        if self._due is None or self._wake_sent:
            return False
        self._wake_sent = True
        self._unread += 1
        return True

    def _send_wake_byte(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:   # full (then it is readable anyway) or closed at shutdown
            with self._lock:
                self._unread = max(0, self._unread - 1)
