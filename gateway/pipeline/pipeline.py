"""The per-message path: MQTT message → route table → Kinesis sink or dead letter → in-order ack.

Invariant owned here: a message's ticket has one part per record made from it plus one per
rejection, and each part is settled exactly once — when Kinesis holds the record, when the dead
letter holds it, or when it is dropped with a counted, logged reason. Only then can the
``AckTracker`` release the message's PUBACK. Nothing on this path blocks on the network.

``intake`` runs on the MQTT network thread; ``settled`` runs on the sink's threads, in bulk. What
the pipeline needs of the route table, the MQTT loop and the sink, and the token it gives the sink
with each record, are in ``ports``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from gateway.model import (
    MAX_PARTITION_KEY_CHARS,
    PUT,
    Failed,
    Message,
    Record,
    Rejected,
    RoutingOutcome,
    Skipped,
    dead_letter_envelope,
    record_size,
)
from gateway.ops.logs import RateLimitedLog
from gateway.pipeline.ports import ActiveTableReader, OnSettled, Outbound, Sink, Token, held_bytes
from gateway.routing.table import Route
from gateway.source.acks import AckTracker

__all__ = ["Pipeline"]

log = logging.getLogger("gateway.pipeline")

_LOGGED_TOPIC_CHARS = 200
_LOG_EVERY_S = 10.0
_INTAKE_ERRORS_UNREADY = 100   # consecutive failing messages before readiness fails


SinkT = TypeVar("SinkT", bound=Sink)


class Pipeline(Generic[SinkT]):
    """Wires one message through routing, the sink and the dead letters to its acknowledgement."""

    def __init__(self, active: ActiveTableReader, acks: AckTracker, metrics: Any, *,
                 make_sink: Callable[[OnSettled], SinkT], outbound: Outbound | None = None,
                 backlog_capacity: int, backlog_capacity_bytes: int = 64 * 1024 * 1024,
                 echo: bool = False) -> None:
        """``make_sink(on_settled)`` builds the sink that reports its settlements to this pipeline
        (so neither needs the other afterwards). Routed records wait in an outbox until
        ``after_read()`` (or ``send_now()``), which the MQTT source calls after each read round: one sink lock
        round-trip per round, not per message."""
        self._active = active
        self._acks = acks
        self._metrics = metrics
        self.backlog_capacity = backlog_capacity
        self.backlog_capacity_bytes = backlog_capacity_bytes
        self._held = 0
        self._held_size = 0
        self._intake_errors = 0   # consecutive messages whose intake raised; reset by a clean one
        self._arrivals = 0        # messages the ack tracker was told about (MQTT thread only)
        self._held_lock = threading.Lock()
        self._outbound = outbound
        self._echo = echo
        self._outbox: list[tuple[Record, Token]] = []
        self._outbox_size = 0     # bytes in the outbox (MQTT thread only): full counts them at once
        self._rate_limited: RateLimitedLog[tuple[str, str]] = RateLimitedLog(log, _LOG_EVERY_S)
        # Per-message counts are plain running totals written only by the MQTT thread;
        # ``flush_counts`` hands the increase to the metrics registry in bulk (a prometheus
        # counter takes a lock per increment).
        self._received: dict[str, int] = {}
        self._unrouted = 0
        self._retained_skips: dict[str, int] = {}
        self._flushed_retained_skips: dict[str, int] = {}
        self._logged_retained_skip: set[str] = set()
        self._flushed: dict[str, int] = {}
        self._flushed_unrouted = 0
        self._flush_lock = threading.Lock()  # the app's tick and a /metrics scrape may meet
        self.sink: SinkT = make_sink(self.settled)
        self._gate: Any = self.sink if hasattr(type(self.sink), "accepting") else None

    @property
    def held(self) -> int:
        """Records (and dead letters) in memory, waiting for Kinesis."""
        return self._held

    @property
    def held_bytes(self) -> int:
        """Bytes of records (and dead letters) in memory, waiting for Kinesis."""
        return self._held_size

    @property
    def intake_failing(self) -> bool:
        """True while message after message fails in intake: readiness says so."""
        return self._intake_errors >= _INTAKE_ERRORS_UNREADY

    def backlog_full(self) -> bool:
        """MQTT thread: what is held plus what this read round has routed so far, or a sink that
        takes nothing now."""
        return (self._held + len(self._outbox) >= self.backlog_capacity
                or self._held_size + self._outbox_size >= self.backlog_capacity_bytes
                or (self._gate is not None and not self._gate.accepting))

    def _is_full(self) -> bool:  # under _held_lock
        return self._held >= self.backlog_capacity or self._held_size >= self.backlog_capacity_bytes

    # -- MQTT network thread ------------------------------------------------------------------

    def intake(self, message: Message, mid: int, qos: int) -> None:
        """Route one message and pass its records on (to the sink, or to the outbox until
        `hand_over` in bulk mode); never blocks, never raises.

        Whatever raises, the message is settled: a message the ack tracker never heard of would
        hold one slot of the broker's in-flight window for ever (docs/delivery.md#backpressure).
        """
        arrived_before = self._arrivals
        try:
            self._intake(message, mid, qos)
        except Exception as error:  # noqa: BLE001 - one line, counted, the message settled
            self._intake_errors += 1
            self._metrics.callback_error()
            self._rate_limited.warning(("-", "intake_error"), f"could not handle a message on topic "
                                       f"{_shown(message.topic)!r} ({type(error).__name__}: {error}); "
                                       "it is dropped and acknowledged", route="-", topic=_shown(message.topic))
            if self._arrivals == arrived_before:
                self._acks.arrived(mid, qos, 0, message.received_ms)
            return
        self._intake_errors = 0

    def _intake(self, message: Message, mid: int, qos: int) -> None:
        if self._echo:
            try:
                _echo(message)
            except (OSError, ValueError) as error:  # a closed stdout must not stop delivery
                self._echo = False
                log.warning("STDOUT=true, but stdout cannot be written (%s): echo turned off", error)
        routes, outcomes = self._active.current.routed(message)
        if not outcomes:
            self._unrouted += 1
            self._arrivals += 1
            self._acks.arrived(mid, qos, 0, message.received_ms)
            return
        if len(outcomes) == 1 and type(outcomes[0]) is Record:   # the common case, in short
            record = outcomes[0]
            route = routes[0]
            name = route.name
            self._received[name] = self._received.get(name, 0) + 1
            self._arrivals += 1
            ticket = self._acks.arrived(mid, qos, 1, message.received_ms)
            size = record.size + len(message.topic)
            if record.data is not message.payload:
                size += len(message.payload)
            self._outbox.append((record, Token(ticket, message, route, False, size)))
            self._outbox_size += size
            return
        records: list[tuple[Record, Route]] = []
        rejected: list[tuple[Rejected, Route]] = []
        received = self._received
        for route, outcome in zip(routes, outcomes, strict=True):
            received[route.name] = received.get(route.name, 0) + 1
            kind = type(outcome)
            if kind is Record:
                records.append((outcome, route))  # type: ignore[arg-type]
            elif kind is Rejected:
                rejected.append((outcome, route))  # type: ignore[arg-type]
        if message.retain:
            self._skipped_retained(message, routes, outcomes)
        parts = len(records) + len(rejected)
        self._arrivals += 1
        ticket = self._acks.arrived(mid, qos, parts, message.received_ms)
        if not parts:
            return
        if records:
            for record, route in records:
                size = held_bytes(record, message)
                self._outbox.append((record, Token(ticket, message, route, size=size)))
                self._outbox_size += size
        if not rejected:
            return
        with self._held_lock:
            self._held += len(rejected)
            self._held_size += (len(message.payload) + len(message.topic)) * len(rejected)
        for rejection, route in rejected:
            code = rejection.code
            self._rate_limited.warning(
                (route.name, code),
                f"message rejected by route {route.name!r} on topic {_shown(message.topic)!r}: {rejection.reason}",
                route=route.name, topic=_shown(message.topic),
            )
            self._dead_letter(Token(ticket, message, route, size=len(message.payload) + len(message.topic)),
                              rejection.reason, code)

    def _skipped_retained(self, message: Message, routes: Sequence[Route], outcomes: Sequence[RoutingOutcome]) -> None:
        """Count the retained copies routes leave out by their `retained` option (the message is
        acknowledged like any other; a skip is the user's choice, so one INFO line per route)."""
        skips = self._retained_skips
        for route, outcome in zip(routes, outcomes, strict=True):
            if type(outcome) is Skipped and outcome.reason.startswith("retained"):
                skips[route.name] = skips.get(route.name, 0) + 1
                if route.name not in self._logged_retained_skip:
                    self._logged_retained_skip.add(route.name)
                    why = ("the broker sent it again for a subscription the session already had"
                           if message.resent else "the route takes no retained messages")
                    log.info("route %r skips retained messages (retained: %s): one on topic %r is not written, "
                             "since %s; counted in mqtt_kinesis_gateway_messages_skipped_total{reason=\"retained\"}",
                             route.name, route.retained, _shown(message.topic), why, extra={"route": route.name})

    def after_read(self) -> None:
        """SourceHooks: the MQTT source ended a read round."""
        self.hand_over()

    def send_now(self) -> None:
        """SourceHooks: a read round ended and the broker waits for our acks (its in-flight window
        is full); the linger would only stall it."""
        if self._outbox:
            self.hand_over(now=True)
        else:
            self.sink.send_now()

    def hand_over(self, now: bool = False) -> None:
        """Give the sink every record routed since the last call (MQTT thread); with ``now``, or
        when the backlog is full, to be sent without waiting out the linger."""
        outbox = self._outbox
        if not outbox:
            return
        self._outbox = []
        size, self._outbox_size = self._outbox_size, 0
        with self._held_lock:
            self._held += len(outbox)
            self._held_size += size
            full = self._is_full()
        self.sink.put(outbox, now=now or full)

    # -- sink threads -------------------------------------------------------------------------

    def settled(self, results: Sequence[tuple[Any, Any]]) -> None:
        """Bulk settlement from the sink: acks for what Kinesis holds, dead letters for the rest."""
        tickets: list[Token] = []
        now_ms = time.time_ns() // 1_000_000
        latencies: dict[str, list[float]] = {}   # route -> receipt-to-held seconds, one metric call each
        for token, settlement in results:
            if settlement == PUT:
                if token.is_dead_letter:
                    self._metrics.records_dead_lettered(token.route.name, 1)
                else:
                    name = token.route.name
                    seconds = latencies.get(name)
                    if seconds is None:
                        seconds = latencies[name] = []
                    seconds.append(max(0, now_ms - token.message.received_ms) / 1000)
                tickets.append(token)
            elif isinstance(settlement, Failed):
                if token.is_dead_letter:
                    self._drop(token, f"dead letter stream refused the record: {settlement.reason}",
                               "dead_letter_failed")
                    tickets.append(token)
                else:
                    code = settlement.code
                    self._rate_limited.warning(
                        (token.route.name, code),
                        f"record of route {token.route.name!r} for stream {token.route.stream!r} not delivered: "
                        f"{settlement.reason}", route=token.route.name, stream=token.route.stream,
                        topic=_shown(token.message.topic),
                    )
                    self._dead_letter(token, settlement.reason, code)
        for name, seconds in latencies.items():
            self._metrics.delivered_many(name, seconds)
        self._release(tickets)

    def _release(self, tokens: list[Token]) -> None:
        if not tokens:
            return
        size = sum(token.size for token in tokens)
        with self._held_lock:
            was_full = self._is_full()
            self._held -= len(tokens)
            self._held_size -= size
            freed = was_full and not self._is_full()
        self._acks.settle([token.ticket for token in tokens])
        if freed and self._outbound is not None:  # the source reads on at once, not at its next poll
            self._outbound.wake()

    # -- dead letters -------------------------------------------------------------------------

    def _dead_letter(self, token: Token, reason: str, code: str) -> None:
        """Send the message where the route says; settle its part when that destination holds it."""
        target = token.route.dead_letter
        if target is None:
            self._drop(token, reason, code)
            self._release([token])
            return
        message = token.message
        envelope = dead_letter_envelope(message.topic, message.payload, message.received_ms, token.route.name,
                                        reason)
        if target.kind == "kinesis":
            key = token.message.topic[:MAX_PARTITION_KEY_CHARS]
            record = Record(token.route.name, target.target, key, envelope, None, record_size(key, envelope))
            self.sink.put([(record, Token(token.ticket, token.message, token.route, is_dead_letter=True,
                                            size=token.size))])
            return
        publisher = self._outbound
        if publisher is None:
            self._drop(token, reason, code)
            self._release([token])
            return

        def done(ok: bool, _reason: str) -> None:
            if ok:
                self._metrics.records_dead_lettered(token.route.name, 1)
            else:
                self._drop(token, f"dead letter topic publish failed: {reason}", "dead_letter_failed")
            self._release([token])

        publisher.publish(target.target, envelope, 1, done)

    def _drop(self, token: Token, reason: str, code: str) -> None:
        self._metrics.records_dropped(token.route.name, code, 1)
        where = " after its dead letter failed" if code == "dead_letter_failed" else " (no dead letter configured)"
        self._rate_limited.warning(
            (token.route.name, "dropped:" + code),
            f"dropped a message of route {token.route.name!r} on topic {_shown(token.message.topic)!r}{where}: "
            f"{reason}",
            route=token.route.name, topic=_shown(token.message.topic),
        )

    def flush(self, everything: bool = False) -> None:
        """The app's periodic tick: counts to the metrics, and the counts of log lines held back
        by rate limiting to the log."""
        self.flush_counts()
        self._rate_limited.flush(_held_back, everything)

    def flush_counts(self) -> None:
        """Hand the per-message counts and the backlog gauge to the metrics (also before every
        scrape, through ``Metrics.before_render``)."""
        with self._flush_lock:
            for route, total in list(self._received.items()):  # list(): one atomic snapshot
                increase = total - self._flushed.get(route, 0)
                if increase:
                    self._metrics.messages_received(route, increase)
                    self._flushed[route] = total
            for route, total in list(self._retained_skips.items()):
                increase = total - self._flushed_retained_skips.get(route, 0)
                if increase:
                    self._metrics.messages_skipped(route, "retained", increase)
                    self._flushed_retained_skips[route] = total
            unrouted = self._unrouted
            if unrouted != self._flushed_unrouted:
                self._metrics.unrouted(unrouted - self._flushed_unrouted)
                self._flushed_unrouted = unrouted
            self._metrics.set_backlog(self._held, self.backlog_capacity, self._held_size,
                                      self.backlog_capacity_bytes)


def _held_back(key: tuple[str, str], held: int) -> tuple[str, dict[str, str]]:
    """The line that tells how many of a (route, reason)'s lines rate limiting held back."""
    route, code = key
    return (f"{held} more message(s) of route {route!r} not delivered for the same reason ({code}) in the last "
            f"{_LOG_EVERY_S:.0f} s", {"route": route})


def _shown(topic: str) -> str:
    """A topic as log lines show it: MQTT allows 65535 bytes, a log line should not."""
    return topic if len(topic) <= _LOGGED_TOPIC_CHARS else topic[:_LOGGED_TOPIC_CHARS] + "…"


def _echo(message: Message) -> None:
    """The seed's STDOUT=true: each message's topic and payload on stdout."""
    text = message.payload.decode("utf-8", "replace")
    sys.stdout.write(f"{message.topic} {text}\n")
