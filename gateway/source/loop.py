"""The MQTT network loop: one thread, one selector, and the policy of when to read.

Why our own loop (paho's public loop_read / loop_write / loop_misc / socket / want_write) instead of
paho's loop_start: backpressure. While the pipeline's backlog is full we stop reading, so QoS 1
messages stay with the broker (its in-flight window bounds what it sends while we send no acks),
yet we keep writing acks and PINGREQs. paho closes the link itself only when a PINGREQ is
outstanding and nothing at all was read for a whole keepalive (it re-arms the ping whenever bytes
arrived), so while paused we read one packet every keepalive/4 s: at most four messages per
keepalive slip past the backlog bound, and a slow Kinesis never starves the keepalive
(docs/delivery.md#backpressure).

Why a read interval (`read_interval_s`, MQTT_READ_INTERVAL_MS): at low rates a message wakes an idle
process, and that wake-up costs several times the work the message needs. Once a read has drained
the socket, the next read waits for the interval, so a trickle is handled a few times a second in
small groups; acks released meanwhile ride that round (docs/performance.md#what-gets-it-there). A
busy socket is never paced (a read that stops at its packet budget reads again at once), nor is any
read while more than _PACE_BELOW_RATE messages a second arrive, nor while the broker waits for our
acks because its in-flight window is full (`gateway.source.window`): then the pipeline is also
asked to send what it holds at once, since the broker sends nothing more until it is acked. Nor
while SUBACKs are awaited: with subscription identifiers each filter has its own SUBSCRIBE, and
10,000 routes paced at one SUBACK a read interval would take minutes to subscribe.

Invariants held here:
- every paho call that touches the connection runs on this loop's thread; other threads only queue
  work in `Outbound` and wake the loop through its socket.
- the wait is a `selectors.DefaultSelector` (epoll on Linux), so a socket's fd number does not
  matter; `select()` refuses fds of 1024 and above.
- time comes only from the injected clock, so the policy is tested without sleeping (the wait for the
  broker's close at shutdown, `gateway.source.closing`, is bounded in real time: it is no policy).
- an error in a round is logged on one line, counted, and the round retried after a backoff; after
  _FAILED_ROUNDS_LIMIT failed rounds in a row the thread ends instead of spinning, and `alive` turns
  False, so /healthz fails and the supervisor restarts the process
  (docs/operations.md#liveness-healthz).
"""

from __future__ import annotations

import logging
import random
import selectors
import threading
from collections.abc import Callable
from typing import Any, Protocol

from gateway.settings.settings import MqttConfig
from gateway.source.closing import closing_copy, wait_for_broker_close
from gateway.source.hooks import SourceHooks
from gateway.source.outbound import Outbound, Taken
from gateway.source.window import WindowWatch

__all__ = ["LoopClient", "NetworkLoop", "NetworkLoopError", "Session"]

log = logging.getLogger("gateway.source.mqtt")

_BURST_PACKETS = 64          # packets read per round while not paused, before waiting again
_PACE_BELOW_RATE = 1000      # msg/s under which reads of a drained socket are paced
_PAUSED_POLL_S = 0.05        # how often a paused loop re-checks the backlog
_FAILED_ROUNDS_LIMIT = 5     # failed rounds in a row after which the loop gives up
_SHUTDOWN_WRITES = 20        # DISCONNECT gets at most this many 0.1 s waits to leave
_SHUTDOWN_LINGER_S = 2.0     # how long a stop waits for the broker to close after DISCONNECT


class NetworkLoopError(Exception):
    """The loop's rounds keep failing; the thread ends so that the process is restarted."""


class LoopClient(Protocol):
    """The part of paho's client the loop drives."""

    def socket(self) -> Any: ...
    def loop_read(self) -> int: ...
    def loop_write(self) -> int: ...
    def loop_misc(self) -> int: ...
    def want_write(self) -> bool: ...
    def disconnect(self) -> int: ...


class Session(Protocol):
    """The MQTT connection as the loop sees it (`gateway.source.session.PahoSession`)."""

    @property
    def client(self) -> LoopClient: ...
    @property
    def connected(self) -> bool: ...
    @property
    def connected_at(self) -> float:
        """Clock time of the last CONNACK (0 before the first)."""
    @property
    def received(self) -> int:
        """PUBLISH packets taken in so far, over all connections."""
    @property
    def outstanding(self) -> int:
        """QoS 1 messages of this connection taken in and not yet acked."""
    @property
    def subscribing(self) -> bool:
        """SUBACKs are awaited: each comes in its own read (one per filter with identifiers)."""
    def connect_once(self) -> bool:
        """One connection attempt; False (logged, counted) if it failed at once."""
    def service(self, taken: Taken) -> None:
        """Put what other threads queued on the wire (acks only while connected); apply
        subscription changes."""
    def callback_failed(self, name: str, exc: Exception) -> None:
        """A hook raised: log it on one line and count it."""
    def closing(self) -> None:
        """The loop is stopping: the disconnect that follows is on purpose."""
    def ended(self) -> None:
        """The loop thread ended: the connection is down for good."""


class NetworkLoop:
    """Runs rounds of wait → service → read → write → keepalive for one `Session`."""

    def __init__(self, session: Session, outbound: Outbound, hooks: SourceHooks, config: MqttConfig, *,
                 clock: Callable[[], float]) -> None:
        self._session = session
        self._outbound = outbound
        self._hooks = hooks
        self._config = config
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._selector.register(outbound, selectors.EVENT_READ)
        self._watched: tuple[Any, int] | None = None      # the client socket and its events
        self._stop = threading.Event()
        self._intake_stopped = threading.Event()
        self._intake_quiet = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_ident: int | None = None
        self._dead = False
        self._not_before = 0.0        # no I/O before this time (reconnect or error backoff)
        self._attempt = 0
        self._backoff_seen_connect = 0.0
        self._failed_in_a_row = 0
        self._failed_rounds = 0
        self._next_read = 0.0         # pacing: a drained socket is read again from this time
        self._next_paused_read = 0.0  # keepalive reads while paused
        self._slow = True             # the message rate is below _PACE_BELOW_RATE (see _pace)
        self._rate_since = 0.0
        self._rate_base = 0
        self._window = WindowWatch()
        self._window_connection = 0.0  # the connection (its CONNACK time) the window watch is about
        self._window_full = False      # the last read found the broker waiting for our acks

    # -- any thread ------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """The loop thread runs (False before start, after stop, or after it died)."""
        return not self._dead and self._thread is not None and self._thread.is_alive()

    @property
    def failed_rounds(self) -> int:
        return self._failed_rounds

    def start(self, name: str = "mqtt-source") -> None:
        if self._thread is not None:
            raise RuntimeError("the MQTT network loop is already started")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """End the loop (it flushes released acks and disconnects); True if the thread ended."""
        self._stop.set()
        self._session.closing()
        self._outbound.wake()
        if self._thread is None:
            self._selector.close()
            return True
        if threading.get_ident() == self._thread_ident:
            return False          # called from a hook: the loop ends after this round
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop_intake(self, timeout: float) -> None:
        """Read nothing more, not even the keepalive reads of a pause; returns once the round that
        was running has finished (a message it was reading has been handed on by then)."""
        self._intake_stopped.set()
        self._outbound.wake()
        thread = self._thread
        if thread is not None and thread.is_alive() and threading.get_ident() != self._thread_ident:
            self._intake_quiet.wait(timeout)

    # -- the loop thread ---------------------------------------------------------------------------

    def step(self, max_wait: float = 1.0) -> None:
        """One round, waiting at most `max_wait` s. Raises `NetworkLoopError` when rounds keep failing."""
        if self._intake_stopped.is_set():
            self._intake_quiet.set()   # the previous round, and its reads, are over
        try:
            self._round(max_wait)
        except Exception as exc:  # noqa: BLE001 - a bug or a broken socket: back off, then give up
            self._failed_rounds += 1
            self._failed_in_a_row += 1
            text = _one_line(exc)
            if self._failed_in_a_row >= _FAILED_ROUNDS_LIMIT:
                message = f"{self._failed_in_a_row} rounds in a row failed, the last with {text}"
                raise NetworkLoopError(message) from None
            log.error("error in MQTT network loop: %s (retrying with backoff)", text)
            self._not_before = self._clock() + self._retry_delay()

    def _run(self) -> None:
        self._thread_ident = threading.get_ident()
        try:
            while not self._stop.is_set():
                self.step()
            self._shutdown()
        except BaseException as exc:  # noqa: BLE001 - reported through `alive`, never a traceback
            self._dead = True
            log.critical("MQTT network loop died: %s", _one_line(exc))
        finally:
            self._session.ended()
            self._selector.close()

    def _round(self, max_wait: float) -> None:
        now = self._clock()
        client = self._session.client
        if now < self._not_before:      # backing off: only what other threads queue is served
            self._wait(None, False, False, min(max_wait, self._not_before - now), patience=max_wait)
            self._session.service(self._outbound.take())
            return
        sock = client.socket()
        if sock is None:
            if not self._session.connect_once():
                self._not_before = now + self._retry_delay()
            return
        self._io_round(client, sock, now, max_wait)
        self._failed_in_a_row = 0
        if client.socket() is None and not self._stop.is_set():
            self._not_before = self._clock() + self._retry_delay()

    def _io_round(self, client: LoopClient, sock: Any, now: float, max_wait: float) -> None:
        paused = self._session.connected and self._hooks.backlog_full()   # CONNACK is always read at once
        may_read = not self._intake_stopped.is_set() and (not paused or now >= self._next_paused_read)
        pacing = may_read and not paused and now < self._next_read
        if pacing:
            may_read = False
        buffered = may_read and _buffered(client, sock)
        timeout = 0.0 if buffered else min(max_wait, self._keepalive(client) / 4)
        if paused:
            timeout = min(timeout, _PAUSED_POLL_S)
        if pacing:
            timeout = min(timeout, self._next_read - now)
        readable = self._wait(sock, may_read, client.want_write(), timeout, patience=self._config.read_interval_s)
        self._session.service(self._outbound.take())
        if buffered or readable:
            self._read(client, paused)
        if client.socket() is not None:
            self._session.service(self._outbound.take())   # acks released while reading
            if client.want_write():
                client.loop_write()
        if client.socket() is not None:
            client.loop_misc()

    def _wait(self, sock: Any, read: bool, write: bool, timeout: float, patience: float) -> bool:
        """Wait for the socket or the outbound; True if the socket is readable."""
        if self._outbound.sleeping(timeout, patience):
            timeout = 0.0
        events = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)
        self._watch(sock if events else None, events)
        for key, mask in self._selector.select(max(0.0, timeout)):
            if key.fileobj is sock and mask & selectors.EVENT_READ:
                return True
        return False

    def _watch(self, sock: Any, events: int) -> None:
        """Keep the selector's registration of the client socket in step with what we wait for."""
        watched = self._watched
        if watched is not None and (sock is not watched[0] or not events):
            self._selector.unregister(watched[0])   # a closed socket is found by identity
            watched = self._watched = None
        if sock is None or not events:
            return
        if watched is None:
            self._selector.register(sock, events)
        elif watched[1] != events:
            self._selector.modify(sock, events)
        self._watched = (sock, events)

    def _read(self, client: LoopClient, paused: bool) -> None:
        self._window_full = False
        try:
            self._read_packets(client, paused)
        finally:
            if self._window_full:   # ends the round too: hands over what it took in, to be sent at once
                self._run_hook("send_now", self._hooks.send_now)
            else:
                self._run_hook("after_read", self._hooks.after_read)

    def _run_hook(self, name: str, hook: Callable[[], None]) -> None:
        try:
            hook()
        except Exception as exc:  # noqa: BLE001 - never let the loop die of a hook
            self._session.callback_failed(name, exc)

    def _read_packets(self, client: LoopClient, paused: bool) -> None:
        if paused:      # just enough to keep paho's keepalive happy; the rest waits in the socket
            self._next_paused_read = self._clock() + self._keepalive(client) / 4
            client.loop_read()
            return
        session = self._session
        drained = getattr(client, "drained", _never)
        for _ in range(_BURST_PACKETS):
            before = session.received
            if client.loop_read() != 0 or client.socket() is None:
                return
            # drained: what the broker sent is all read (or known to be, without reading again)
            if session.received == before or drained():
                self._drained()
                return
            if self._hooks.backlog_full():
                return

    def _drained(self) -> None:
        now = self._clock()
        session = self._session
        if session.connected_at != self._window_connection:
            self._window_connection = session.connected_at
            self._window.new_connection()
        self._window_full = self._window.drained(session.outstanding, now, session.received)
        self._pace(now)

    def _pace(self, now: float) -> None:
        """After a drained read, wait out the read interval, but only while the rate is low and the
        broker is not waiting for our acks: a QoS 1 stream is bounded by the broker's in-flight
        window per round trip, and pacing would lengthen the trip."""
        interval = self._config.read_interval_s
        elapsed = now - self._rate_since
        count = self._session.received - self._rate_base
        if count >= _PACE_BELOW_RATE * max(elapsed, interval):
            self._slow = False           # a burst shows at once...
            self._rate_since, self._rate_base = now, self._session.received
        elif elapsed >= 1.0:
            self._slow = True            # ...its end after a second below the rate
            self._rate_since, self._rate_base = now, self._session.received
        paced = self._slow and not self._window_full and not self._session.subscribing
        self._next_read = now + interval if paced else 0.0

    def _retry_delay(self) -> float:
        """Capped exponential backoff with full jitter above the floor; resets after a stable link."""
        c = self._config
        connected_at = self._session.connected_at
        if connected_at != self._backoff_seen_connect:     # each connection is looked at once
            self._backoff_seen_connect = connected_at
            if self._clock() - connected_at >= c.reconnect_max_s:
                self._attempt = 0
        cap = min(c.reconnect_max_s, c.reconnect_min_s * 2 ** min(self._attempt, 30))
        self._attempt += 1
        return random.uniform(c.reconnect_min_s, cap)

    def _keepalive(self, client: LoopClient) -> float:
        """The keepalive in force: an MQTT 5 broker may impose its own (Server Keep Alive)."""
        value = getattr(client, "keepalive", None)
        return float(value) if isinstance(value, (int, float)) and value > 0 else float(self._config.keepalive_s)

    def _shutdown(self) -> None:
        """Let already-released acks out, send DISCONNECT, wait for the broker to close, close.
        The session stays at the broker."""
        client = self._session.client
        sock = client.socket()
        if sock is None:
            return
        self._session.service(self._outbound.take())
        linger = closing_copy(sock)    # paho closes its socket as soon as DISCONNECT is written
        client.disconnect()
        for _ in range(_SHUTDOWN_WRITES):
            sock = client.socket()
            if sock is None or not client.want_write():
                break
            self._watch(sock, selectors.EVENT_WRITE)
            self._selector.select(0.1)
            client.loop_write()
        self._watch(None, 0)
        sock = client.socket()
        if sock is not None:      # DISCONNECT never left: the broker has no reason to close
            sock.close()
            if linger is not None:
                linger.close()
        elif linger is not None:
            wait_for_broker_close(linger, _SHUTDOWN_LINGER_S)


def _never() -> bool:
    return False


def _buffered(client: Any, sock: Any) -> bool:
    """Bytes already taken off the socket (by BufferedClient, or inside TLS) wait to be parsed."""
    in_client = getattr(client, "buffered", None)
    if in_client is not None and in_client() > 0:
        return True
    in_tls = getattr(sock, "pending", None)
    return in_tls is not None and in_tls() > 0


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())
