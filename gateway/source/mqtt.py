"""The MQTT source: what the app holds of the broker connection.

`MqttSource` connects (and reconnects) on its own thread, hands every PUBLISH to the pipeline's
hooks, sends the acks the ack tracker releases, publishes what the pipeline queues (dead letters)
and keeps the subscriptions the route table wants. It only assembles the parts, each of which owns
one invariant: `connect` (the connection options that keep the session), `loop` (when to read and
write; the only thread that calls paho), `session` (what paho's callbacks mean), `outbound` (how
other threads ask the loop to send), `acks` (when an ack may go out), `subscriptions` (wanted vs.
granted filters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gateway.settings.settings import MqttConfig
from gateway.source.acks import AckTracker
from gateway.source.connect import MqttSourceError, build_client
from gateway.source.fastpath import BufferedClient
from gateway.source.hooks import SourceHooks
from gateway.source.loop import NetworkLoop
from gateway.source.outbound import Outbound
from gateway.source.session import PahoSession, SourceMetrics
from gateway.source.subscriptions import SubscriptionBook

__all__ = ["MqttSource", "MqttSourceError"]


class MqttSource:
    """One broker connection: intake of messages, ordered acks, subscriptions, backpressure."""

    def __init__(self, config: MqttConfig, *, hooks: SourceHooks, acks: AckTracker, outbound: Outbound,
                 subscriptions: Iterable[tuple[str, int]] = (), retain_handling: Mapping[str, int] | None = None,
                 metrics: SourceMetrics | None = None,
                 client_factory: Callable[..., Any] = BufferedClient,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`config.persistent` must be decided (not None). `client_factory` builds the paho client
        (tests pass a scripted fake); `clock` is the monotonic clock of the loop's read policy."""
        self.config = config
        self.subscriptions = SubscriptionBook(config.share_group)
        self.subscriptions.set_desired(subscriptions, retain_handling)
        client = build_client(config, client_factory)   # may raise: nothing started yet
        self._session = PahoSession(config, client, hooks=hooks, acks=acks, outbound=outbound,
                                    subscriptions=self.subscriptions, metrics=metrics, clock=clock)
        self._loop = NetworkLoop(self._session, outbound, hooks, config, clock=clock)
        self._outbound = outbound

    @property
    def connected(self) -> bool:
        return self._session.connected

    @property
    def session_present(self) -> bool | None:
        """What the last successful CONNACK said (None before the first one)."""
        return self._session.session_present

    @property
    def alive(self) -> bool:
        """The loop thread runs (False before start, after stop, or after it died)."""
        return self._loop.alive

    @property
    def subscriptions_granted(self) -> bool:
        return self._session.subscriptions_granted

    def stats(self) -> dict[str, int]:
        """Counters for metrics and tests (connect failures, session losses, callback errors...)."""
        return {**self._session.stats(), "loop_errors": self._loop.failed_rounds}

    def start(self) -> None:
        """Start the loop thread; it connects (and reconnects) on its own until `stop()`."""
        self._loop.start()

    def step(self, max_wait: float = 0.0) -> None:
        """Run one round of the loop on the calling thread instead (tests drive the source so)."""
        self._loop.step(max_wait)

    def stop(self, timeout: float = 5.0) -> bool:
        """Flush released acks, disconnect cleanly (the session stays), join; True if it ended."""
        return self._loop.stop(timeout)

    def stop_intake(self, timeout: float = 2.0) -> None:
        """Read nothing more, not even the bounded keepalive reads of a pause: for the drain at
        shutdown, so every message taken in is one the drain waits for. Acks still go out."""
        self._loop.stop_intake(timeout)

    def wait_connected(self, timeout: float) -> bool:
        return self._session.wait_for(lambda: self._session.connected, timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """Until every wanted subscription is granted, or one is refused (then False)."""
        self._session.wait_for(lambda: self.subscriptions_granted or bool(self.subscriptions.refused)
                               or self._session.sharing_refused, timeout)
        return self.subscriptions_granted

    def update_subscriptions(self, subscriptions: Iterable[tuple[str, int]],
                             retain_handling: Mapping[str, int] | None = None) -> None:
        """Replace the wanted set (a route reload); applied as a diff on the live connection,
        new filters before removed ones, and in full on each connect. `retain_handling` (MQTT 5,
        filter -> 0/1/2) applies from the next SUBSCRIBE of each filter."""
        self.subscriptions.set_desired(subscriptions, retain_handling)
        self._outbound.wake()
