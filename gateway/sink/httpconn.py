"""Kept-alive HTTP(S) connections to one AWS endpoint, on the standard library.

Why not urllib3 or botocore's session: both cost megabytes of a process whose whole AWS traffic is
a POST to ``/`` on one host; ``http.client`` already sends the headers and a bytes body in one
write. TLS verifies against ``AWS_CA_BUNDLE`` (or the profile's ``ca_bundle``) when set, else
certifi's bundle as botocore does, else the system store. A proxy is used as the SDKs use one:
``HTTPS_PROXY`` for https endpoints (a CONNECT tunnel; TLS and SigV4 end to end with AWS),
``HTTP_PROXY`` for http ones (absolute-URI requests), ``NO_PROXY`` exempts hosts, and
``user:password@`` in the proxy URL is sent as Basic ``Proxy-Authorization``
(docs/iam.md#how-the-gateway-calls-kinesis).

Invariants owned here: a connection is used by one request at a time and goes back to the pool
only after its response was read completely; a failure never leaves a half-used connection in the
pool. The connect timeout bounds connecting (and the TLS handshake), the read timeout every read
after it. A request on a reused connection that the server had closed meanwhile is sent once more
on a new one (the server closed an idle connection: nothing was received).
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from gateway.sink.errors import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

__all__ = ["ConnectionPool", "Endpoint", "Proxy", "Response", "one_shot", "tls_context"]

_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where requests go: ``url`` as configured, split into what a connection needs."""

    url: str
    https: bool
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint URL {url!r}: expected http(s)://host[:port]")
        https = parts.scheme == "https"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(url, https, parts.hostname, parts.port or (443 if https else 80), path)

    @property
    def host_header(self) -> str:
        """The Host header (and what SigV4 signs): the port only when it is not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.https else 80) else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Proxy:
    """The proxy an endpoint's connections go through: host, port, and its auth header if any."""

    host: str
    port: int
    headers: dict[str, str]

    @classmethod
    def for_endpoint(cls, endpoint: Endpoint) -> Proxy | None:
        """From the environment, as the SDKs read it; None when unset or NO_PROXY exempts the host."""
        names = ("https_proxy", "HTTPS_PROXY") if endpoint.https else ("http_proxy", "HTTP_PROXY")
        name = next((n for n in names if os.environ.get(n)), None)
        if name is None:
            return None
        url = os.environ[name]
        from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # noqa: PLC0415

        if proxy_bypass_environment(endpoint.host):
            return None
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{name}: proxy URL {url!r} not supported; expected http://[user:password@]host[:port]")
        headers = {}
        if parts.username is not None:
            secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            headers["Proxy-Authorization"] = "Basic " + base64.b64encode(secret).decode("ascii")
        return cls(parts.hostname, parts.port or 80, headers)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


_contexts: dict[str | None, ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """One verifying context per CA bundle, shared (loading a bundle costs ~1 MB)."""
    with _contexts_lock:
        context = _contexts.get(ca_bundle)
        if context is None:
            cafile = ca_bundle
            if cafile is None:
                try:
                    import certifi  # noqa: PLC0415 - only for https, as botocore does

                    cafile = certifi.where()
                except ImportError:  # the system store
                    cafile = None
            context = ssl.create_default_context(cafile=cafile)
            _contexts[ca_bundle] = context
        return context


class ConnectionPool:
    """Up to ``max_idle`` idle connections to ``endpoint``, reused last-in first-out."""

    def __init__(self, endpoint: Endpoint, *, connect_timeout_s: float, read_timeout_s: float,
                 max_idle: int = 10, ca_bundle: str | None = None) -> None:
        self.endpoint = endpoint
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_idle = max(1, max_idle)
        self._context = tls_context(ca_bundle) if endpoint.https else None
        self._proxy = Proxy.for_endpoint(endpoint)
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(self, method: str, headers: dict[str, str], body: bytes, path: str | None = None) -> Response:
        """Send one request (to the endpoint's path unless ``path``); raise a TransportError when no
        complete response came."""
        target = path or self.endpoint.path
        proxy = self._proxy
        if proxy is not None and not self.endpoint.https:   # a plain-HTTP proxy takes absolute URIs
            target = f"http://{self.endpoint.host_header}{target}"
            headers = {**headers, **proxy.headers}
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                return self._exchange(conn, method, target, headers, body)
            except _STALE:
                pass  # an idle connection the server closed: once more on a new one
        return self._exchange(self._connect(), method, target, headers, body, fresh=True)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connect(self) -> http.client.HTTPConnection:
        ep = self.endpoint
        proxy = self._proxy
        host, port = (proxy.host, proxy.port) if proxy is not None else (ep.host, ep.port)
        conn: http.client.HTTPConnection
        if self._context is not None:
            conn = http.client.HTTPSConnection(host, port, timeout=self._connect_timeout_s, context=self._context)
            if proxy is not None:   # TLS to AWS through the tunnel: the certificate is checked for ep.host
                conn.set_tunnel(ep.host, ep.port, headers=proxy.headers)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout_s)
        try:
            conn.connect()
        except TimeoutError as exc:
            conn.close()
            raise ConnectTimeoutError(f'Connect timeout on endpoint URL: "{ep.url}"') from exc
        except OSError as exc:
            conn.close()
            raise EndpointConnectionError(f'Could not connect to the endpoint URL: "{ep.url}" ({exc})') from exc
        sock = conn.sock
        if sock is not None:
            sock.settimeout(self._read_timeout_s)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _exchange(self, conn: http.client.HTTPConnection, method: str, target: str, headers: dict[str, str],
                  body: bytes, fresh: bool = False) -> Response:
        ep = self.endpoint
        try:
            conn.request(method, target, body=body, headers=headers)
            reply = conn.getresponse()
            data = reply.read()
        except _STALE as exc:
            conn.close()
            if not fresh:
                raise
            raise ConnectionClosedError(f'Connection was closed before we received a valid response from endpoint '
                                        f'URL: "{ep.url}".') from exc
        except TimeoutError as exc:
            conn.close()
            raise ReadTimeoutError(f'Read timeout on endpoint URL: "{ep.url}"') from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ConnectionClosedError(f'Connection to endpoint URL "{ep.url}" failed: '
                                        f'{type(exc).__name__}: {exc}') from exc
        response = Response(reply.status, {k.lower(): v for k, v in reply.getheaders()}, data)
        keep = not reply.will_close
        if keep:
            with self._lock:
                keep = len(self._idle) < self._max_idle
                if keep:
                    self._idle.append(conn)
        if not keep:
            conn.close()
        return response


def one_shot(url: str, method: str, headers: dict[str, str], body: bytes, timeout_s: float,
             ca_bundle: str | None = None) -> Response:
    """One request on a connection of its own (credential endpoints: rare, each its own host)."""
    endpoint = Endpoint.parse(url)
    pool = ConnectionPool(endpoint, connect_timeout_s=timeout_s, read_timeout_s=timeout_s,
                          max_idle=1, ca_bundle=ca_bundle)
    try:
        return pool.request(method, {"Host": endpoint.host_header, **headers}, body)
    finally:
        pool.close()
