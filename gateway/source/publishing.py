"""The publishes other threads queued in `Outbound` (MQTT dead letters) and paho's answers to them.

Invariant owned here: each publish's ``done(ok, reason)`` runs once, on the loop thread: when
paho answers it (the broker's PUBACK for QoS 1, the write for QoS 0), or at once when paho refuses
it (a bad topic, a full queue). paho may answer inside ``publish()``, before it returned the mid
that names the answer; such an answer is kept until that mid is known. A QoS 1 publish made while
disconnected is queued by paho and resent after the reconnect. A ``done`` that raises is reported
to ``on_error`` and never reaches paho (docs/delivery.md#callbacks-never-block-or-raise).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho

from gateway.source.connect import describe_error
from gateway.source.outbound import Publish

__all__ = ["Publishes"]

log = logging.getLogger("gateway.source.mqtt")


class Publishes:
    """Hands queued publishes to paho and each answer to its ``done`` (loop thread only: no lock)."""

    def __init__(self, client: Any, on_error: Callable[[str, Exception], None]) -> None:
        self._client = client
        self._on_error = on_error
        self._delivery: dict[int, Callable[[bool, str], None]] = {}   # publish mid -> done
        self._early: dict[int, tuple[bool, str]] = {}                  # answered inside publish()
        self._publishing = False

    def publish(self, publish: Publish) -> None:
        """Hand one queued publish to paho; one paho refuses at once is ``done(False)``."""
        self._publishing = True
        try:
            info = self._client.publish(publish.topic, publish.payload, publish.qos)
        except (ValueError, TypeError) as exc:
            self._refused(publish, describe_error(exc))
            return
        finally:
            self._publishing = False
        early = self._early.pop(info.mid, None)
        self._early.clear()
        if early is not None:
            self._deliver(publish.done, *early)
        elif info.rc == paho.MQTT_ERR_SUCCESS or (info.rc == paho.MQTT_ERR_NO_CONN and publish.qos > 0):
            self._delivery[info.mid] = publish.done
        else:
            self._refused(publish, paho.error_string(info.rc))

    def answered(self, mid: int, ok: bool, reason: str) -> None:
        """paho's on_publish: the publish ``mid`` was acknowledged (or failed)."""
        done = self._delivery.pop(mid, None)
        if done is not None:
            self._deliver(done, ok, reason)
        elif self._publishing:
            self._early[mid] = (ok, reason)   # answered inside publish(), before it returned the mid

    def _refused(self, publish: Publish, reason: str) -> None:
        log.error("MQTT publish to %r refused: %s", publish.topic, reason)
        self._deliver(publish.done, False, reason)

    def _deliver(self, done: Callable[[bool, str], None], ok: bool, reason: str) -> None:
        try:
            done(ok, reason)
        except Exception as exc:  # noqa: BLE001 - the pipeline's callback must not end the loop
            self._on_error("publish done", exc)
