"""What the MQTT source asks of whoever takes its messages (the pipeline implements it).

Kept apart from the paho adapter so that the pipeline can name these types without importing
paho. Every hook runs on the MQTT network loop thread, which also sends the keepalive pings; so a
hook never blocks and never waits for Kinesis (docs/delivery.md#callbacks-never-block-or-raise).
An exception in a hook is logged on one line and counted, never raised into paho.
"""

from __future__ import annotations

from typing import Protocol

from gateway.model import Message

__all__ = ["SourceHooks"]


class SourceHooks(Protocol):
    """The pipeline's side of the MQTT source."""

    def intake(self, message: Message, mid: int, qos: int) -> None:
        """One PUBLISH, in arrival order. Must call `acks.arrived(mid, qos, parts)` exactly once
        for it (the ack tracker the source was given), and must not block."""

    def after_read(self) -> None:
        """A read round ended (it may have taken in messages): hand them on in bulk."""

    def send_now(self) -> None:
        """A read round ended, and the broker sends nothing more until we ack what we hold (its
        in-flight window is full): instead of ``after_read``, hand on what the round took in and
        send it, with what was handed over before, without waiting out the linger
        (docs/performance.md#what-gets-it-there)."""

    def backlog_full(self) -> bool:
        """While True the source stops reading; the pipeline calls `Outbound.wake()` when the
        backlog has room again (docs/delivery.md#backpressure)."""
