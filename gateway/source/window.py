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

Acks that come back fast (the spool commits in milliseconds) let a steady stream look like a window:
every paced read then finds the same number held, the messages read in that round, twice in a row.
The rate tells them apart. A broker that waited for our acks sends faster once we ack at once; a
steady stream keeps its rate. So a hold that received messages no faster than `_FASTER` times the
rate that led to it disproves that count: signs at it do not bind for `_RETEST_S`, or until the
ceiling or the connection changes. A hold without messages (a quiet spell) disproves nothing. The
disproof expires because a real window misjudged (traffic just above what pacing lets through)
piles up messages at the broker meanwhile, which the next hold then drains fast: the re-test
corrects it, and a steady stream pays one hold per `_RETEST_S`.

Pure: no threads, no I/O; the loop calls it on its own thread with its own clock's time.
"""

from __future__ import annotations

__all__ = ["WindowWatch"]


_HOLD_CAP_FACTOR = 16   # the hold doubles on each renewal that follows straight on, up to this many times hold_s
_FASTER = 2.0           # a window judged right makes the broker send at least this much faster while bound
_RETEST_S = 30.0        # how long a disproof lasts before the same count may bind again


class WindowWatch:
    """Per connection: is the broker's in-flight window, not its traffic, what stopped the flow?"""

    def __init__(self, hold_s: float = 1.0) -> None:
        self._base_hold_s = hold_s
        self._hold_s = hold_s
        self._ceiling = 0          # the most QoS 1 messages held unacked at a drained read
        self._streak = 0           # drained reads in a row, while not bound, that found exactly the ceiling
        self._bound_until = 0.0
        self._sign: tuple[float, int] | None = None   # (time, messages received) at the first sign
        self._hold: tuple[float, int, float] | None = None   # (start, received, rate before) of a hold to judge
        self._last_in_hold: tuple[float, int] | None = None  # (time, received) at the hold's last drained read
        self._disproven = 0        # a ceiling that a hold showed to be a steady stream's, not a window
        self._disproven_until = 0.0

    def new_connection(self) -> None:
        """A new connection may come with another window (another broker, another config)."""
        self._ceiling = self._streak = self._disproven = 0
        self._bound_until = 0.0
        self._hold_s = self._base_hold_s
        self._sign = self._hold = self._last_in_hold = None

    def drained(self, outstanding: int, now: float, received: int | None = None) -> bool:
        """A read found no further PUBLISH while `outstanding` QoS 1 messages wait for their
        acks; True while the broker is judged to be waiting for those acks. `received` counts the
        messages of this connection so far (None: no rates, nothing is ever disproven)."""
        bound = now < self._bound_until
        if self._disproven and now >= self._disproven_until:
            self._disproven = 0
        if self._hold is not None:
            if bound:
                self._last_in_hold = None if received is None else (now, received)
            else:
                self._judge_hold(now)
        if outstanding <= 0:                 # nothing held: no evidence either way
            self._streak = 0
        elif outstanding > self._ceiling:    # more in flight than ever: the window is at least this
            self._ceiling, self._streak = outstanding, 1
            self._sign = None if received is None else (now, received)
            self._bound_until = 0.0
            self._hold_s = self._base_hold_s
            return False
        elif outstanding == self._ceiling:
            if not bound and outstanding != self._disproven:   # while bound we ack at once: no evidence
                self._streak += 1
                if self._streak == 1:
                    self._sign = None if received is None else (now, received)
                else:
                    self._bind(now, received)
        else:
            self._streak = 0
        return now < self._bound_until

    def bound(self, now: float) -> bool:
        return now < self._bound_until

    def _bind(self, now: float, received: int | None) -> None:
        renewed = self._bound_until > 0 and now - self._bound_until <= self._base_hold_s
        self._hold_s = (min(self._hold_s * 2, self._base_hold_s * _HOLD_CAP_FACTOR) if renewed
                        else self._base_hold_s)
        self._bound_until = now + self._hold_s
        self._streak = 0
        self._hold = self._last_in_hold = None
        if received is not None and self._sign is not None and now > self._sign[0] and self._ceiling > 1:
            self._hold = (now, received, (received - self._sign[1]) / (now - self._sign[0]))

    def _judge_hold(self, now: float) -> None:
        """A hold ended: if acking at once did not make the broker send faster, the count it was
        judged on is a steady stream's. Judged on the drained reads within the hold only, and only
        when they span half of it (a quiet spell is no evidence). A ceiling of one is never judged:
        a stream that slow costs nothing bound, and a window of one must stay detectable."""
        assert self._hold is not None
        start, at_start, rate_before = self._hold
        last, self._hold, self._last_in_hold = self._last_in_hold, None, None
        if last is None or last[0] - start < self._hold_s / 2:
            return
        if (last[1] - at_start) / (last[0] - start) < _FASTER * rate_before:
            self._disproven, self._disproven_until = self._ceiling, now + _RETEST_S
