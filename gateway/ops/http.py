"""The one HTTP listener: ``/healthz`` (liveness), ``/readyz`` (readiness) and ``/metrics``.

Liveness answers "are the gateway's own threads alive" and never looks at the broker or Kinesis:
a broker outage must not make Kubernetes restart every replica. Readiness may depend on both.
Both answers come from callables the app supplies, so this module knows nothing about MQTT or AWS.

Only GET and HEAD on the three paths are served; any other path is 404, any other method 405.
Requests are not logged (probes would flood the log) and responses never contain settings.

Invariant: whatever clients do, the listener holds at most ``max_connections`` connections (and,
for an instant, the one just accepted that makes room), runs two threads (the event loop and one
metrics renderer), and closes every connection within ``request_timeout_s`` of accepting it.

Why an asyncio loop in one thread: ``ThreadingHTTPServer`` gave each connection a thread, so
thousands of slow sockets became thousands of threads, and its timeout applied per ``recv``, so a
client sending one byte every few seconds held a thread for ever. prometheus-client's own server
is built on the same class, and a bounded WSGI server would be a new dependency for three fixed
paths. Here a connection is a task on one loop and ``asyncio.timeout`` bounds the whole exchange
(head, body, answer) from accept to close; keep-alive is off, so every answer ends the connection.
The loop runs its own accept loop rather than ``asyncio.start_server``, which accepts up to a
backlog's worth of sockets per wake-up before any of our code runs: a burst would pass the cap
and the process's file descriptor limit, shared with MQTT and boto3. At the cap a new connection
is still taken: the oldest one that has not finished sending its request is closed to make room,
so stalled sockets cannot lock the probes out; only when every open connection is being answered
is the new one closed at once. The probe callables run on the loop (they only read flags). The
metrics exposition (tens of milliseconds for a few dozen routes) runs on one worker thread, so a
render never delays a probe, and scrapes arriving while a render runs share its bytes rather than
queueing one render each.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urlsplit

from gateway.ops.metrics import CONTENT_TYPE

__all__ = ["HealthServer", "Liveness", "Readiness", "Renders"]

log = logging.getLogger(__name__)

Liveness = Callable[[], bool]
Readiness = Callable[[], tuple[bool, Mapping[str, bool]] | tuple[bool, Mapping[str, bool], Mapping[str, str]]]
Answer = tuple[int, str, bytes]

_JSON = "application/json"
_BACKLOG = 1024  # the kernel caps it at net.core.somaxconn; 200 scrapers at once fit
_MAX_HEAD_BYTES = 8192  # request line and headers; probes and scrapers send a few hundred
_MAX_BODY_BYTES = 8192  # nothing here takes a body; a small one is read and dropped
_STOP_WAIT_S = 1.0
_WARN_EVERY_S = 60.0
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # what RFC 9110 allows as a method
_TRANSIENT_ACCEPT_ERRORS = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EAGAIN, errno.EINTR)
_RESOURCE_ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Renders(Protocol):
    """What ``/metrics`` needs: ``gateway.ops.metrics.Metrics`` fits."""

    def render(self) -> bytes: ...


class _Refused(Exception):
    """A request this listener answers with an error status and no further work."""

    def __init__(self, status: int, message: str, allow: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.allow = status, message, allow


class HealthServer:
    """Serves the probes and metrics from one daemon thread running an asyncio loop.

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stop_requested: asyncio.Event | None = None
        # Owned by the loop thread once started:
        self._open: dict[asyncio.Task[None], socket.socket] = {}
        self._reading: dict[asyncio.Task[None], None] = {}  # insertion order = age, oldest first
        self._rendering: asyncio.Future[Answer] | None = None
        self._renderer: ThreadPoolExecutor | None = None
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
        self._stop_requested = asyncio.Event()
        self._renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="http-metrics")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(self._loop, listener), name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close every connection and release the port within about a second.

        Safe to call twice or before ``start``.
        """
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        self._stopping.set()
        if self._stop_requested is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended (the thread died)
                loop.call_soon_threadsafe(self._stop_requested.set)
        thread.join(timeout=_STOP_WAIT_S)
        if thread.is_alive():
            log.warning("HTTP listener did not stop within %.0f s", _STOP_WAIT_S)
        self._bound_port = None

    def answer(self, path: str) -> Answer:
        """(status, content type, body) for a GET of ``path``; no sockets, so tests can call it."""
        if path == "/healthz":
            alive = _safely(self._liveness, False)
            return (200 if alive else 503), _JSON, _json({"status": "ok" if alive else "failed"})
        if path == "/readyz":
            answer = _safely(self._readiness, (False, {"readiness_check": False}))
            ready, checks = answer[0], answer[1]
            body: dict[str, Any] = {"status": "ready" if ready else "not ready",
                                    "checks": {str(k): bool(v) for k, v in checks.items()}}
            problems = answer[2] if len(answer) > 2 else {}
            if problems:  # what is wrong, by what: e.g. {"stream welder": "ResourceNotFoundException: ..."}
                body["problems"] = {str(k): str(v) for k, v in problems.items()}
            return (200 if ready else 503), _JSON, _json(body)
        if path == "/metrics":
            try:
                return 200, CONTENT_TYPE, self._render_metrics()
            except Exception:
                log.exception("rendering metrics failed")
                return 500, _JSON, _json({"error": "metrics unavailable"})
        return 404, _JSON, _json({"error": "not found"})

    # -- the loop thread --------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(listener))
        except BaseException:
            log.exception("HTTP listener stopped unexpectedly; probes and metrics are no longer served")
        finally:
            for sock in self._open.values():
                sock.close()
            self._open.clear()
            self._reading.clear()
            listener.close()
            if self._renderer is not None:
                self._renderer.shutdown(wait=False, cancel_futures=True)
            loop.close()

    async def _serve(self, listener: socket.socket) -> None:
        assert self._stop_requested is not None
        accepting = asyncio.create_task(self._accept(listener))
        stop = asyncio.create_task(self._stop_requested.wait())
        await asyncio.wait((accepting, stop), return_when=asyncio.FIRST_COMPLETED)
        accepting.cancel()
        stop.cancel()
        connections = list(self._open)
        for task in connections:
            task.cancel()
        if self._rendering is not None:
            self._rendering.cancel()  # a render not yet started never starts
        await asyncio.gather(accepting, stop, *connections, return_exceptions=True)
        if accepting.done() and not accepting.cancelled() and accepting.exception() is not None:
            raise accepting.exception()  # type: ignore[misc]

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno in _RESOURCE_ACCEPT_ERRORS:
                    self._warn(f"HTTP listener cannot accept: {exc.strerror}; retrying")
                    await asyncio.sleep(0.1)
                    continue
                if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                    continue  # the client gave up before we got to it
                raise
            if len(self._open) >= self._max_connections and not self._make_room():
                sock.close()
            else:
                task = loop.create_task(self._connection(sock))
                self._open[task] = sock
                self._reading[task] = None
                task.add_done_callback(functools.partial(self._closed, sock))
            await asyncio.sleep(0)  # let closed connections go before the next accept

    def _make_room(self) -> bool:
        """Close the oldest connection still sending its request; False if every one is being answered."""
        self._warn(f"HTTP listener at its cap of {self._max_connections} connections; closing the oldest"
                   " unfinished requests first")
        if not self._reading:
            return False
        oldest = next(iter(self._reading))
        del self._reading[oldest]
        self._open.pop(oldest, None)  # its socket closes as the task unwinds, before the next accept
        oldest.cancel()
        return True

    def _closed(self, sock: socket.socket, task: asyncio.Task[None]) -> None:
        """Forget the connection and close its socket (again, harmlessly, if the task already did).

        Also the done callback, because a task cancelled before its first step never runs its ``finally``.
        """
        self._open.pop(task, None)
        self._reading.pop(task, None)
        sock.close()

    def _warn(self, message: str) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("%s", message)

    async def _connection(self, sock: socket.socket) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._exchange(sock)
        except OSError:  # includes TimeoutError: a slow, gone or resetting client is cut, not news
            log.debug("HTTP connection dropped", exc_info=True)
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            self._closed(sock, asyncio.current_task())  # type: ignore[arg-type]

    async def _exchange(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            request = await _read_request(loop, sock)
            if request is None:
                return  # closed before a whole request
            method, path = request
            self._reading.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            if method not in ("GET", "HEAD"):
                raise _Refused(405, "method not allowed", allow=True)
        except _Refused as refused:
            extra = {"Allow": "GET, HEAD"} if refused.allow else {}
            await loop.sock_sendall(sock, _response(refused.status, _JSON, _json({"error": refused.message}),
                                                    head=False, extra=extra))
            return
        status, content_type, body = await self._metrics() if path == "/metrics" else self.answer(path)
        await loop.sock_sendall(sock, _response(status, content_type, body, head=method == "HEAD"))

    async def _metrics(self) -> Answer:
        """The exposition from the worker thread; concurrent scrapes share one render."""
        if self._rendering is None:
            assert self._renderer is not None
            rendering = asyncio.get_running_loop().run_in_executor(self._renderer, self.answer, "/metrics")
            self._rendering = rendering
            rendering.add_done_callback(lambda _: setattr(self, "_rendering", None))
        return await asyncio.shield(self._rendering)


async def _read_request(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[str, str] | None:
    """(method, path) of one request, its body read and dropped; None if the client left first."""
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > _MAX_HEAD_BYTES:
            raise _Refused(431, "request header fields too large")
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            return None
        buffer += chunk
    if end > _MAX_HEAD_BYTES:
        raise _Refused(431, "request header fields too large")
    lines = buffer[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[2].startswith("HTTP/1."):
        raise _Refused(400, "bad request")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise _Refused(400, "bad request")
        headers[name.strip().lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _Refused(400, "bad request")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise _Refused(400, "bad request")
    if int(length_text) > _MAX_BODY_BYTES:
        raise _Refused(413, "request too large")
    missing = int(length_text) - (len(buffer) - end - 4)
    while missing > 0:
        chunk = await loop.sock_recv(sock, missing)
        if not chunk:
            return None
        missing -= len(chunk)
    return parts[0], urlsplit(parts[1]).path


def _response(status: int, content_type: str, body: bytes, head: bool,
              extra: Mapping[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Server: mqtt-kinesis-gateway",
             f"Date: {formatdate(usegmt=True)}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Cache-Control: no-store", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


def _safely(check: Callable[[], Any], failed: Any) -> Any:
    """A probe callable that raises counts as failing; the exception is logged, not returned."""
    try:
        return check()
    except Exception:
        log.exception("health check raised")
        return failed


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode() + b"\n"
