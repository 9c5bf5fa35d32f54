"""The pipeline's seams: what it needs of the route table, the MQTT loop and the sink, as
protocols (so that each side can be faked in tests), and the token it hands the sink with each
record, which comes back with the record's settlement.

Invariant owned here: a token's ``size`` is the memory its record holds while it waits for the
sink (``held_bytes``), so that the pipeline's backlog in bytes adds and removes the same amounts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gateway.model import Message, Record, Settlement
from gateway.routing.table import Route, RouteTable
from gateway.source.acks import Ticket

__all__ = ["ActiveTableReader", "OnSettled", "Outbound", "Sink", "Token", "held_bytes"]


class ActiveTableReader(Protocol):
    @property
    def current(self) -> RouteTable: ...


class Outbound(Protocol):
    """``gateway.source.outbound.Outbound``: what the pipeline asks the MQTT loop to do."""

    def publish(self, topic: str, payload: bytes, qos: int, done: Callable[[bool, str], None]) -> None:
        """A dead letter to an MQTT topic; ``done(ok, reason)`` runs on the loop thread."""

    def wake(self) -> None:
        """The full backlog has room again: read on."""


class Sink(Protocol):
    """``gateway.sink.kinesis.KinesisSink`` (or ``gateway.spool.spooled.SpooledSink``) as the pipeline
    uses it. A sink may also have an ``accepting`` property: while it is False, the backlog counts as
    full (the spool is full or cannot be written), and the sink wakes the source when it turns True."""

    def put(self, entries: Sequence[tuple[Record, Any]], *, now: bool = False) -> None:
        """``now``: the broker waits for these records' acks, or the backlog is full: send them (and
        whatever waits) without waiting out the linger; ``put`` and ``send_now`` in one step."""

    def send_now(self) -> None: ...


OnSettled = Callable[[Sequence[tuple[Any, Settlement]]], None]


class Token:
    """What travels with a record through the sink and comes back with its settlement.

    ``size`` is the memory it holds: the record's bytes, plus the message's payload when the record
    carries a copy of it rather than the payload itself (a transform, an appended newline).
    """

    __slots__ = ("is_dead_letter", "message", "route", "size", "ticket")

    def __init__(self, ticket: Ticket, message: Message, route: Route, is_dead_letter: bool = False,
                 size: int = 0) -> None:
        self.ticket = ticket
        self.message = message
        self.route = route
        self.is_dead_letter = is_dead_letter
        self.size = size

    @property
    def dead_letter(self) -> str | None:
        """The route's dead letter as the spool keeps it: ``kinesis:<stream>``, ``mqtt:<topic>`` or None."""
        target = self.route.dead_letter
        return None if target is None else f"{target.kind}:{target.target}"


def held_bytes(record: Record, message: Message) -> int:
    """What holding ``record`` keeps in memory: its bytes, the message's topic, and the payload
    too when the record carries a copy of it rather than the payload itself."""
    held = record.size + len(message.topic)
    return held if record.data is message.payload else held + len(message.payload)
