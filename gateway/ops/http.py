"""The one HTTP listener: ``/healthz`` (liveness), ``/readyz`` (readiness) and ``/metrics``.

Liveness answers "are the gateway's own threads alive" and never looks at the broker or Kinesis:
a broker outage must not make Kubernetes restart every replica. Readiness may depend on both.
Both answers come from callables the app supplies, so this module knows nothing about MQTT or AWS.

Only GET and HEAD on the three paths are served; any other path is 404, any other method 405.
Requests are not logged (probes would flood the log) and responses never contain settings.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlsplit

from gateway.ops.metrics import CONTENT_TYPE

__all__ = ["HealthServer", "Liveness", "Readiness", "Renders"]

log = logging.getLogger(__name__)

Liveness = Callable[[], bool]
Readiness = Callable[[], tuple[bool, Mapping[str, bool]]]

_JSON = "application/json"


class Renders(Protocol):
    """What ``/metrics`` needs: ``gateway.ops.metrics.Metrics`` fits."""

    def render(self) -> bytes: ...


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    gateway: HealthServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr; a dropped probe connection is not news.
        log.debug("http request from %s failed", client_address[0], exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "mqtt-kinesis-gateway"
    sys_version = ""
    timeout = 10  # a client that never finishes its request does not hold a thread forever

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def __getattr__(self, name: str) -> Any:
        # http.server answers 501 for a method without a do_<METHOD>; every method other than
        # GET and HEAD is a well-formed request for the wrong method here, so 405.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self._send(405, _JSON, b'{"error":"method not allowed"}\n', head=False,
                   extra={"Allow": "GET, HEAD"})

    def _respond(self, head: bool) -> None:
        path = urlsplit(self.path).path
        status, content_type, body = self.server.gateway.answer(path)
        self._send(status, content_type, body, head)

    def _send(self, status: int, content_type: str, body: bytes, head: bool,
              extra: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence: probes every few seconds would drown the real log lines."""


class HealthServer:
    """Serves the probes and metrics from a daemon thread.

    ``metrics`` is the ``Metrics`` instance (or pass ``render_metrics``, a callable returning
    the exposition bytes); ``liveness`` returns False when a thread the
    gateway depends on has died; ``readiness`` returns (ready, {check name: passed}), e.g.
    ``routes_loaded``, ``broker_connected``, ``subscriptions_granted``, ``kinesis_reachable``.
    Port 0 binds a free port; ``port`` is the bound one after ``start()``.
    """

    def __init__(self, host: str, port: int, metrics: Renders | None = None,
                 liveness: Liveness | None = None, readiness: Readiness | None = None, *,
                 render_metrics: Callable[[], bytes] | None = None) -> None:
        self.host, self._requested_port = host, port
        if render_metrics is None:
            render_metrics = metrics.render if metrics is not None else (lambda: b"")
        self._render_metrics = render_metrics
        self._liveness = liveness or (lambda: True)
        self._readiness = readiness or (lambda: (True, {}))
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve; an address in use is an ``OSError`` naming host and port."""
        cls = _Server6 if ":" in self.host else _Server
        try:
            server = cls((self.host, self._requested_port), _Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"HTTP listener {self.host}:{self._requested_port}:"
                                     f" {exc.strerror}") from None
        server.gateway = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice or before ``start``."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of ``path``; no sockets, so tests can call it."""
        if path == "/healthz":
            alive = _safely(self._liveness, False)
            return (200 if alive else 503), _JSON, _json({"status": "ok" if alive else "failed"})
        if path == "/readyz":
            ready, checks = _safely(self._readiness, (False, {"readiness_check": False}))
            body = {"status": "ready" if ready else "not ready",
                    "checks": {str(k): bool(v) for k, v in checks.items()}}
            return (200 if ready else 503), _JSON, _json(body)
        if path == "/metrics":
            try:
                return 200, CONTENT_TYPE, self._render_metrics()
            except Exception:  # noqa: BLE001 - a scrape must not take the listener down
                log.exception("rendering metrics failed")
                return 500, _JSON, _json({"error": "metrics unavailable"})
        return 404, _JSON, _json({"error": "not found"})


def _safely(check: Callable[[], Any], failed: Any) -> Any:
    """A probe callable that raises counts as failing; the exception is logged, not returned."""
    try:
        return check()
    except Exception:  # noqa: BLE001
        log.exception("health check raised")
        return failed


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode() + b"\n"
