"""Per-connection, in-order release of MQTT acknowledgements.

Invariant owned here: **this is the only module that decides when a PUBACK (or PUBCOMP) is sent.**

Why it exists: PUBACK hands ownership of a message from the broker to us (MQTT 3.1.1 / 5.0
§4.3.2), so it may go out only when every record made from the message is held by Kinesis (or was
dead-lettered on purpose). Records finish out of order (many batches, retries), but MQTT demands
acks in arrival order ([MQTT-4.6.0-2]); so completed tickets wait behind the oldest incomplete one
(a low-water mark over a deque). Acks belong to one connection: paho's reconnect drops queued acks
and a broker may reuse a packet id on the new connection, so `new_connection()` forgets every
pending ticket of the old one and their later settlements do nothing
(docs/delivery.md#acks-and-ordering).

Threading: `arrived()` and `new_connection()` run on the MQTT network thread; `settle()` runs on
sink threads, in bulk (one lock round-trip per call). Released acks are handed to the outlet
(`Outbound.ack_many`, once per call) while the lock is held, which is what keeps acks released by two concurrent
`settle()` calls in order, and what guarantees that once `new_connection()` returns no ack of the
old connection is handed out any more. So the outlet must be quick, must not block and must never
call back into the tracker: `Outbound` only queues the ack for the network loop.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from gateway.model import now_ms

__all__ = ["AckOutlet", "AckTracker", "Ticket"]

log = logging.getLogger(__name__)


class AckOutlet(Protocol):
    """Where released acks go (`gateway.source.outbound.Outbound`)."""

    def ack_many(self, acks: list[tuple[int, int]]) -> None:
        """(mid, qos) of each released ack, in the order they must go out."""


class Ticket:
    """One received message waiting for its records to settle.

    Opaque to everyone but the tracker: the pipeline only passes it along with the records (as the
    sink's token) and hands it back to `settle()`. `received_ms` is public so the pipeline can
    observe receipt→ack latency for the tickets the tracker reports as done. `remaining` (parts not
    yet settled) and `released` are written by the tracker only.
    """

    __slots__ = ("generation", "mid", "qos", "received_ms", "released", "remaining")

    def __init__(self, mid: int, qos: int, generation: int, parts: int, received_ms: int) -> None:
        self.mid = mid
        self.qos = qos
        self.generation = generation
        self.received_ms = received_ms
        self.remaining = parts
        self.released = False

    @property
    def complete(self) -> bool:
        """Every part settled (the ack may still wait behind an earlier ticket)."""
        return self.remaining <= 0

    @property
    def done(self) -> bool:
        """Acked (QoS 1/2), or complete (QoS 0), or dropped with its connection."""
        return self.released

    def __repr__(self) -> str:
        return (f"Ticket(mid={self.mid}, qos={self.qos}, gen={self.generation}, "
                f"remaining={self.remaining}, done={self.released})")


class AckTracker:
    """Releases acks as a low-water mark over the tickets of the current connection."""

    def __init__(self, outlet: AckOutlet, *, clock_ms: Callable[[], int] = now_ms) -> None:
        """`outlet.ack_many(acks)` is told the acks each call releases, in order (see module
        docstring: quick, no re-entry)."""
        self._outlet = outlet
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._generation = 0
        self._pending: deque[Ticket] = deque()   # QoS>=1 tickets of the current generation, arrival order

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def pending(self) -> int:
        """Tickets of the current connection whose ack has not gone out yet."""
        return len(self._pending)

    def new_connection(self) -> None:
        """Start a new connection generation: every unreleased ack of the old one is dropped."""
        with self._lock:
            self._generation += 1
            dropped = len(self._pending)
            for ticket in self._pending:
                ticket.released = True
            self._pending.clear()
        if dropped:
            log.info("new MQTT connection: %d unacknowledged message(s) of the previous connection "
                     "will be redelivered by the broker, not acked", dropped)

    def arrived(self, mid: int, qos: int, parts: int, received_ms: int | None = None) -> Ticket:
        """Register a message in arrival order; `parts` is how many settlements complete it."""
        if parts < 0:
            raise ValueError(f"parts must be >= 0, got {parts}")
        stamp = self._clock_ms() if received_ms is None else received_ms
        done: list[Ticket] = []
        with self._lock:
            ticket = Ticket(mid, qos, self._generation, parts, stamp)
            if qos <= 0:
                if parts == 0:
                    ticket.released = True
            else:
                self._pending.append(ticket)
                if parts == 0 and len(self._pending) == 1:
                    self._release(done)
        return ticket

    def settle(self, tickets: Iterable[Ticket]) -> list[Ticket]:
        """One part of each given ticket is finished (a ticket may appear several times).

        Returns the tickets that became done through this call: acked QoS 1/2 tickets in ack order,
        and QoS 0 tickets whose parts all settled. Settling a ticket of an earlier connection, or
        more often than its parts, does nothing.
        """
        done: list[Ticket] = []
        with self._lock:
            head_completed = False
            generation = self._generation
            for ticket in tickets:
                if ticket.released or ticket.remaining <= 0:
                    continue
                ticket.remaining -= 1
                if ticket.remaining > 0:
                    continue
                if ticket.qos <= 0:
                    ticket.released = True
                    done.append(ticket)
                elif ticket.generation == generation:
                    head_completed = True
            if head_completed:
                self._release(done)
        return done

    def _release(self, done: list[Ticket]) -> None:
        """Pop every complete ticket at the head and hand their acks over at once (lock held)."""
        pending = self._pending
        released: list[tuple[int, int]] = []
        while pending and pending[0].remaining <= 0:
            ticket = pending.popleft()
            ticket.released = True
            released.append((ticket.mid, ticket.qos))
            done.append(ticket)
        if not released:
            return
        try:
            self._outlet.ack_many(released)
        except Exception as exc:  # noqa: BLE001 - an unsent ack means a redelivery, not a loss
            log.error("sending %d ack(s) from mid %d failed: %s: %s", len(released), released[0][0],
                      type(exc).__name__, exc)
