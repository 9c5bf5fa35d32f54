"""Noticing a broker that has stopped sending because its in-flight window is full.

A broker sends at most its in-flight window of QoS 1 messages without a PUBACK (Mosquitto's
`max_inflight_messages` on MQTT 3.1.1, the client's Receive Maximum on MQTT 5, ejabberd one). The
gateway holds each PUBACK until Kinesis holds the message, and at low rates it also waits out the
read interval and the linger to save CPU (docs/performance.md#what-gets-it-there). With a wide
window that costs nothing: messages keep arriving meanwhile. With a narrow one the broker stops
until the acks come, so the wait becomes the throughput: a window of one message held for 300 ms
is three messages a second.

Invariant owned here: **a broker's window never makes the read interval or the linger the
throughput limit, and a stream we merely answer quickly is never taken for a window for ever.** The
window is not announced, so it is inferred: when a read finds the socket drained while messages are
held unacked, and the number held equals the most ever held on this connection, twice in a row, the
broker is waiting for us. From then on, for a hold time, the loop does not pace its reads and asks
the pipeline to send what it holds at once. A wide window at a low rate rarely shows the sign (the
number held varies and its maximum is rarely met twice in a row), so it keeps the CPU saving.

While judged bound, the gateway acks each message at once, and a wide-window stream whose messages
come further apart than that turnaround then also shows one held at every read: signs seen while
bound are our own doing and prove nothing. So the judgment is not extended by them: it ends after
its hold time, and only two fresh signs, read while pacing and lingering again, renew it. A stream
that was only answered quickly then piles up more than one unacked message and is released; a real
window renews at once, and each renewal that follows straight on the last doubles the hold (up to
`_HOLD_CAP_FACTOR` times), so a window of one pays for the re-check only now and then.

Pure: no threads, no I/O; the loop calls it on its own thread with its own clock's time.
"""

from __future__ import annotations

__all__ = ["WindowWatch"]


_HOLD_CAP_FACTOR = 16   # the hold doubles on each renewal that follows straight on, up to this many times hold_s


class WindowWatch:
    """Per connection: is the broker's in-flight window, not its traffic, what stopped the flow?"""

    def __init__(self, hold_s: float = 1.0) -> None:
        self._base_hold_s = hold_s
        self._hold_s = hold_s
        self._ceiling = 0          # the most QoS 1 messages held unacked at a drained read
        self._streak = 0           # drained reads in a row, while not bound, that found exactly the ceiling
        self._bound_until = 0.0

    def new_connection(self) -> None:
        """A new connection may come with another window (another broker, another config)."""
        self._ceiling = self._streak = 0
        self._bound_until = 0.0
        self._hold_s = self._base_hold_s

    def drained(self, outstanding: int, now: float) -> bool:
        """A read found no further PUBLISH while `outstanding` QoS 1 messages wait for their
        acks; True while the broker is judged to be waiting for those acks."""
        bound = now < self._bound_until
        if outstanding <= 0:                 # nothing held: no evidence either way
            self._streak = 0
        elif outstanding > self._ceiling:    # more in flight than ever: the window is at least this
            self._ceiling, self._streak = outstanding, 1
            self._bound_until = 0.0
            self._hold_s = self._base_hold_s
            return False
        elif outstanding == self._ceiling:
            if not bound:                    # while bound we ack at once: no evidence (see above)
                self._streak += 1
                if self._streak >= 2:
                    self._bind(now)
        else:
            self._streak = 0
        return now < self._bound_until

    def bound(self, now: float) -> bool:
        return now < self._bound_until

    def _bind(self, now: float) -> None:
        renewed = self._bound_until > 0 and now - self._bound_until <= self._base_hold_s
        self._hold_s = (min(self._hold_s * 2, self._base_hold_s * _HOLD_CAP_FACTOR) if renewed
                        else self._base_hold_s)
        self._bound_until = now + self._hold_s
        self._streak = 0
