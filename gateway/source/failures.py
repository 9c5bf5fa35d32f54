"""Connect failures told once, with the likely fix, and repeated every 10 s while they last.

Why apart from the session: what a failed connection *means* depends on settings the user can
change (MQTT_TLS, MQTT_PORT, MQTT_PROTOCOL), and the first line a user sees should name the one
to change. The invariant: the first failure of a kind is logged at once; while the same failure
repeats, one line every `REPEAT_LOG_S` says it still does (with the attempt count), so a wrong
port never goes quiet and never floods the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["REPEAT_LOG_S", "ConnectFailures", "closed_before_connack", "refused", "sharing_unavailable"]

REPEAT_LOG_S = 10.0

_V311_FIX = "the broker may speak only MQTT 3.1.1: set MQTT_PROTOCOL=3.1.1"


def refused(reason: str, reason_value: int, protocol: str) -> str:
    """The line for a CONNACK that refused us (`reason_value`: its reason code)."""
    text = f"broker refused the connection: {reason}"
    # 0x84 (MQTT 5) or 1 (a 3.1.1 broker's "unacceptable protocol version"), to an MQTT 5 CONNECT
    if protocol == "5" and (reason_value in (0x84, 1) or "protocol version" in reason.lower()):
        text += f"; {_V311_FIX}"
    return text


def closed_before_connack(reason: str, protocol: str) -> str:
    """The line for a connection closed before any CONNACK: a TLS mismatch, or (on MQTT 5) a
    3.1.1-only broker that drops or ignores the MQTT 5 CONNECT."""
    tls = "check MQTT_TLS and MQTT_PORT: a TLS listener drops plain MQTT and a plain one drops TLS"
    if protocol == "5":
        return f"connection closed before CONNACK ({reason}); {_V311_FIX}; or {tls}"
    return f"connection closed before CONNACK ({reason}); {tls}"


def sharing_unavailable(share_group: str) -> str:
    """The line for an MQTT 5 CONNACK without shared subscriptions while a share group is set."""
    return (f"MQTT_SHARE_GROUP={share_group} is set, but the broker does not support shared subscriptions "
            "(CONNACK SharedSubscriptionAvailable=0): nothing is subscribed and the gateway is not ready; "
            "unset MQTT_SHARE_GROUP or use a broker that shares")


class ConnectFailures:
    """The run of identical connect failures; thread-safe."""

    def __init__(self, log: logging.Logger, where: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self._where, self._clock = log, where, clock
        self._lock = threading.Lock()
        self._last = ""
        self._since = 0.0       # when the current run of identical failures began
        self._logged = 0.0      # when it was last logged
        self._attempts = 0

    def connected(self) -> None:
        with self._lock:
            self._last = ""

    def failed(self, reason: str) -> None:
        now = self._clock()
        with self._lock:
            repeated, self._last = reason == self._last, reason
            if not repeated:
                self._since, self._logged, self._attempts = now, now, 1
                due = False
            else:
                self._attempts += 1
                due = now - self._logged >= REPEAT_LOG_S
                if due:
                    self._logged = now
            attempts, since = self._attempts, now - self._since
        if not repeated:
            self._log.error("cannot connect to MQTT broker %s: %s (retrying with backoff)", self._where, reason)
        elif due:
            self._log.error("still cannot connect to MQTT broker %s after %d attempts in %.0f s: %s", self._where,
                            attempts, since, reason)
