"""The one HTTP listener: ``/healthz`` (liveness), ``/readyz`` (readiness) and ``/metrics``.

Liveness answers "are the gateway's own threads alive" and never looks at the broker or Kinesis:
a broker outage must not make Kubernetes restart every replica. Readiness may depend on both.
Both answers come from callables the app supplies, so this module knows nothing about MQTT or AWS.

Only GET and HEAD on the three paths are served; any other path is 404, any other method 405.
Requests are not logged (probes would flood the log) and responses never contain settings.

Invariant: whatever clients do, the listener holds at most ``max_connections`` connections (and,
for an instant, the one just accepted that makes room), runs two threads (the event loop and one
metrics renderer), and closes every connection within ``request_timeout_s`` of accepting it.

Why a ``selectors`` loop in one thread: ``ThreadingHTTPServer`` gave each connection a thread, so
thousands of slow sockets became thousands of threads, and its timeout applied per ``recv``, so a
client sending one byte every few seconds held a thread for ever. prometheus-client's own server
is built on the same class, and a bounded WSGI server would be a new dependency for three fixed
paths. asyncio did the job in about 1.5 MB more of the process (docs/performance.md#memory); a
connection here is a small state (reading, waiting for a render, writing) on one
``selectors.DefaultSelector``, and a deadline set at accept bounds the whole exchange (head, body,
answer) from accept to close; keep-alive is off, so every answer ends the connection. One socket
is accepted per turn of the loop, so a burst of connections cannot pass the cap and the process's
file descriptor limit, shared with MQTT and the Kinesis client, before the cap is applied. At the
cap a new connection is still taken: the oldest one that has not finished sending its request is
closed to make room, so stalled sockets cannot lock the probes out; only when every open
connection is being answered is the new one closed at once. The probe callables run on the loop
(they only read flags). The metrics exposition (tens of milliseconds for a few dozen routes) runs
on one worker thread, so a render never delays a probe, and scrapes arriving while a render runs
share its bytes rather than queueing one render each.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from gateway.ops.httpwire import JSON, Refused, json_body, parse_head, response
from gateway.ops.metrics import CONTENT_TYPE

__all__ = ["HealthServer", "Liveness", "Readiness", "Renders"]

log = logging.getLogger(__name__)

Liveness = Callable[[], bool]
Readiness = Callable[[], tuple[bool, Mapping[str, bool]] | tuple[bool, Mapping[str, bool], Mapping[str, str]]]
Answer = tuple[int, str, bytes]

_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn; 200 scrapers at once fit
_STOP_WAIT_S = 1.0
_WARN_EVERY_S = 60.0
_ACCEPT_PAUSE_S = 0.1  # out of descriptors or memory: accept again after this
_TRANSIENT_ACCEPT_ERRORS = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN, errno.EINTR)
_RESOURCE_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Renders(Protocol):
    """What ``/metrics`` needs: ``gateway.ops.metrics.Metrics`` fits."""

    def render(self) -> bytes: ...


class _Connection:
    """One accepted socket: its deadline, the request so far, and the answer still to send."""

    __slots__ = ("body_missing", "deadline", "head", "method", "outgoing", "path", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline
        self.head = bytearray()
        self.method = self.path = ""   # set once the head is whole
        self.body_missing = 0          # body bytes still to read and drop
        self.outgoing: memoryview | None = None


class HealthServer:
    """Serves the probes and metrics from one daemon thread running a ``selectors`` loop.

    ``metrics`` is the ``Metrics`` instance (or pass ``render_metrics``, a callable returning
    the exposition bytes); ``liveness`` returns False when a thread the
    gateway depends on has died; ``readiness`` returns (ready, {check name: passed}) and optionally
    a third item, {what: what is wrong with it}, shown as ``problems``; check names are e.g.
    ``routes_loaded``, ``broker_connected``, ``subscriptions_granted``, ``kinesis_reachable``.
    Port 0 binds a free port; ``port`` is the bound one after ``start()``. ``max_connections``
    caps open sockets; ``request_timeout_s`` is how long one connection may take, accept to close.
    """

    def __init__(self, host: str, port: int, metrics: Renders | None = None,
                 liveness: Liveness | None = None, readiness: Readiness | None = None, *,
                 render_metrics: Callable[[], bytes] | None = None,
                 max_connections: int = 256, request_timeout_s: float = 5.0) -> None:
        if max_connections < 1 or request_timeout_s <= 0:
            raise ValueError("HTTP listener: max_connections must be >= 1 and request_timeout_s > 0")
        self.host, self._requested_port = host, port
        if render_metrics is None:
            render_metrics = metrics.render if metrics is not None else (lambda: b"")
        self._render_metrics = render_metrics
        self._liveness = liveness or (lambda: True)
        self._readiness = readiness or (lambda: (True, {}))
        self._max_connections = max_connections
        self._timeout_s = request_timeout_s
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._waker: socket.socket | None = None   # a byte written here wakes the loop
        # The renderer thread hands its answer to the loop under this lock:
        self._render_lock = threading.Lock()
        self._render_wanted = threading.Event()
        self._rendered: Answer | None = None
        # Owned by the loop thread once started:
        self._open: dict[socket.socket, _Connection] = {}   # insertion order = accept order = deadline order
        self._reading: dict[socket.socket, None] = {}        # still sending their request, oldest first
        self._awaiting_render: list[_Connection] = []        # unregistered from the selector meanwhile
        self._warned_at = float("-inf")

    @property
    def port(self) -> int:
        return self._requested_port if self._bound_port is None else self._bound_port

    @property
    def alive(self) -> bool:
        """True from ``start()`` to ``stop()`` while the listener's thread runs; liveness may use it."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def open_connections(self) -> int:
        """Sockets currently held (an instant's reading; for tests and diagnostics)."""
        return len(self._open)

    def start(self) -> None:
        """Bind and serve; an address in use is an ``OSError`` naming host and port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            listener = socket.create_server((self.host, self._requested_port), family=family, backlog=_BACKLOG)
        except OSError as exc:
            raise OSError(exc.errno, f"HTTP listener {self.host}:{self._requested_port}:"
                                     f" {exc.strerror}") from None
        listener.setblocking(False)
        self._bound_port = int(listener.getsockname()[1])
        self._stopping.clear()
        self._render_wanted.clear()
        self._rendered = None
        self._waker, woken = socket.socketpair()
        self._waker.setblocking(False)
        woken.setblocking(False)
        threading.Thread(target=self._render_forever, name="http-metrics", daemon=True).start()
        self._thread = threading.Thread(target=self._run, args=(listener, woken), name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close every connection and release the port within about a second.

        Safe to call twice or before ``start``.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._render_wanted.set()   # the renderer sees the stop once it is done with any render
        self._wake()
        thread.join(timeout=_STOP_WAIT_S)
        if thread.is_alive():
            log.warning("HTTP listener did not stop within %.0f s", _STOP_WAIT_S)
        self._bound_port = None

    def answer(self, path: str) -> Answer:
        """(status, content type, body) for a GET of ``path``; no sockets, so tests can call it."""
        if path == "/healthz":
            alive = _safely(self._liveness, False)
            return (200 if alive else 503), JSON, json_body({"status": "ok" if alive else "failed"})
        if path == "/readyz":
            answer = _safely(self._readiness, (False, {"readiness_check": False}))
            ready, checks = answer[0], answer[1]
            body: dict[str, Any] = {"status": "ready" if ready else "not ready",
                                    "checks": {str(k): bool(v) for k, v in checks.items()}}
            problems = answer[2] if len(answer) > 2 else {}
            if problems:  # what is wrong, by what: e.g. {"stream welder": "ResourceNotFoundException: ..."}
                body["problems"] = {str(k): str(v) for k, v in problems.items()}
            return (200 if ready else 503), JSON, json_body(body)
        if path == "/metrics":
            try:
                return 200, CONTENT_TYPE, self._render_metrics()
            except Exception:
                log.exception("rendering metrics failed")
                return 500, JSON, json_body({"error": "metrics unavailable"})
        return 404, JSON, json_body({"error": "not found"})

    # -- the renderer thread ----------------------------------------------------------------

    def _render_forever(self) -> None:
        while True:
            self._render_wanted.wait()
            if self._stopping.is_set():
                return
            self._render_wanted.clear()
            rendered = self.answer("/metrics")
            with self._render_lock:
                self._rendered = rendered
            self._wake()

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            with contextlib.suppress(OSError):   # its buffer is full, so the loop wakes anyway; or it has ended
                waker.send(b"x")

    # -- the loop thread --------------------------------------------------------------------

    def _run(self, listener: socket.socket, woken: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(woken, selectors.EVENT_READ)
            self._serve(selector, listener, woken)
        except BaseException:
            log.exception("HTTP listener stopped unexpectedly; probes and metrics are no longer served")
        finally:
            for sock in self._open:
                sock.close()
            self._open.clear()
            self._reading.clear()
            self._awaiting_render.clear()
            selector.close()
            listener.close()
            waker, self._waker = self._waker, None
            woken.close()
            if waker is not None:
                waker.close()
            self._stopping.set()
            self._render_wanted.set()

    def _serve(self, selector: selectors.BaseSelector, listener: socket.socket, woken: socket.socket) -> None:
        accept_again_at: float | None = 0.0   # None while the listener is registered
        while not self._stopping.is_set():
            now = time.monotonic()
            if accept_again_at is not None and now >= accept_again_at:
                accept_again_at = None
                selector.register(listener, selectors.EVENT_READ)
            self._close_expired(selector, now)
            wake_at = min(next(iter(self._open.values())).deadline if self._open else float("inf"),
                          float("inf") if accept_again_at is None else accept_again_at)
            timeout = None if wake_at == float("inf") else max(0.0, wake_at - now)  # idle: sleep until a client
            for key, _ in selector.select(timeout):
                if key.fileobj is woken:
                    _drain(woken)
                    self._hand_out_render(selector)
                elif key.fileobj is listener:
                    if not self._accept(selector, listener):
                        selector.unregister(listener)
                        accept_again_at = time.monotonic() + _ACCEPT_PAUSE_S
                elif (conn := self._open.get(key.fileobj)) is not None:  # type: ignore[call-overload]
                    self._step(selector, conn)

    def _accept(self, selector: selectors.BaseSelector, listener: socket.socket) -> bool:
        """Take one connection; False when the process is out of descriptors or memory (pause)."""
        try:
            sock, _ = listener.accept()
        except OSError as exc:
            if exc.errno in _RESOURCE_ACCEPT_ERRORS:
                self._warn(f"HTTP listener cannot accept: {exc.strerror}; retrying")
                return False
            if exc.errno in _TRANSIENT_ACCEPT_ERRORS or isinstance(exc, BlockingIOError):
                return True   # the client gave up before we got to it
            raise
        if len(self._open) >= self._max_connections and not self._make_room(selector):
            sock.close()
            return True
        sock.setblocking(False)
        self._open[sock] = _Connection(sock, time.monotonic() + self._timeout_s)
        self._reading[sock] = None
        selector.register(sock, selectors.EVENT_READ)
        return True

    def _make_room(self, selector: selectors.BaseSelector) -> bool:
        """Close the oldest connection still sending its request; False if every one is being answered."""
        self._warn(f"HTTP listener at its cap of {self._max_connections} connections; closing the oldest"
                   " unfinished requests first")
        if not self._reading:
            return False
        self._close(selector, self._open[next(iter(self._reading))])
        return True

    def _close_expired(self, selector: selectors.BaseSelector, now: float) -> None:
        """Every connection past its deadline, oldest first: a slow or stalled client is cut, not news."""
        while self._open:
            conn = next(iter(self._open.values()))
            if conn.deadline > now:
                return
            self._close(selector, conn)

    def _close(self, selector: selectors.BaseSelector, conn: _Connection) -> None:
        self._open.pop(conn.sock, None)
        self._reading.pop(conn.sock, None)
        if conn in self._awaiting_render:
            self._awaiting_render.remove(conn)
        else:
            selector.unregister(conn.sock)
        conn.sock.close()

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("%s", message)

    def _step(self, selector: selectors.BaseSelector, conn: _Connection) -> None:
        """Move one connection on (its one registered event fired); any failure closes it."""
        try:
            if conn.outgoing is not None:
                self._send(selector, conn)
            else:
                self._receive(selector, conn)
        except OSError:   # a gone or resetting client is cut, not news
            log.debug("HTTP connection dropped", exc_info=True)
            self._close(selector, conn)
        except Exception:
            log.exception("HTTP connection failed")
            self._close(selector, conn)

    def _receive(self, selector: selectors.BaseSelector, conn: _Connection) -> None:
        chunk = conn.sock.recv(4096 if not conn.method else conn.body_missing)
        if not chunk:
            self._close(selector, conn)   # the client left before a whole request
            return
        try:
            if not conn.method:
                conn.head += chunk
                request = parse_head(conn.head)
                if request is None:
                    return
                conn.method, conn.path, conn.body_missing = request
                conn.head = bytearray()
            else:
                conn.body_missing -= len(chunk)
            if conn.body_missing > 0:
                return
            if conn.method not in ("GET", "HEAD"):
                raise Refused(405, "method not allowed", allow=True)
        except Refused as refused:
            extra = {"Allow": "GET, HEAD"} if refused.allow else {}
            self._respond(selector, conn, response(refused.status, JSON, json_body({"error": refused.message}),
                                                    head=False, extra=extra))
            return
        if conn.path == "/metrics":
            self._await_render(selector, conn)
        else:
            status, content_type, body = self.answer(conn.path)
            self._respond(selector, conn, response(status, content_type, body, head=conn.method == "HEAD"))

    def _await_render(self, selector: selectors.BaseSelector, conn: _Connection) -> None:
        """Park the connection until the renderer's next answer; a render under way is shared."""
        self._reading.pop(conn.sock, None)   # being answered: never evicted to make room
        selector.unregister(conn.sock)
        self._awaiting_render.append(conn)
        if len(self._awaiting_render) == 1:
            self._render_wanted.set()

    def _hand_out_render(self, selector: selectors.BaseSelector) -> None:
        with self._render_lock:
            rendered, self._rendered = self._rendered, None
        if rendered is None:
            return
        waiting, self._awaiting_render = self._awaiting_render, []
        status, content_type, body = rendered
        for conn in waiting:
            try:
                self._respond(selector, conn, response(status, content_type, body, head=conn.method == "HEAD"),
                              parked=True)
            except OSError:
                log.debug("HTTP connection dropped", exc_info=True)
                self._close(selector, conn)

    def _respond(self, selector: selectors.BaseSelector, conn: _Connection, data: bytes, *,
                 parked: bool = False) -> None:
        """Send ``data``, then close; from here the connection is being answered, never evicted.
        ``parked``: it waited for a render, unregistered from the selector meanwhile."""
        self._reading.pop(conn.sock, None)
        conn.outgoing = memoryview(data)
        (selector.register if parked else selector.modify)(conn.sock, selectors.EVENT_WRITE)
        self._send(selector, conn)

    def _send(self, selector: selectors.BaseSelector, conn: _Connection) -> None:
        assert conn.outgoing is not None
        try:
            sent = conn.sock.send(conn.outgoing)
        except BlockingIOError:
            return
        conn.outgoing = conn.outgoing[sent:]
        if not conn.outgoing:
            self._close(selector, conn)   # keep-alive is off: the answer ends the connection


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        while sock.recv(4096):
            pass


def _safely(check: Callable[[], Any], failed: Any) -> Any:
    """A probe callable that raises counts as failing; the exception is logged, not returned."""
    try:
        return check()
    except Exception:
        log.exception("health check raised")
        return failed
