"""The Kinesis client's connections go through HTTPS_PROXY / HTTP_PROXY as the SDKs' do, and
NO_PROXY exempts hosts: a local scripted proxy and a local TLS server on 127.0.0.1."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.sink.httpconn import ConnectionPool, Endpoint, Proxy
from tests.support.certs import make_test_pki


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        reply = f"{self.path} {body.decode()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *_: Any) -> None:
        pass


def _serve(server: http.server.HTTPServer) -> Iterator[http.server.HTTPServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    pki = make_test_pki(tmp_path)
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for _ in _serve(server):
        yield server.server_address[1], pki.ca


@pytest.fixture
def plain_server() -> Iterator[int]:
    for server in _serve(http.server.HTTPServer(("127.0.0.1", 0), _Answer)):
        yield server.server_address[1]


class _Proxy:
    """CONNECT tunnels and absolute-URI requests, each one recorded with its headers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(65536)
        request, _, rest = head.partition(b"\r\n\r\n")
        first, *lines = request.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        self.seen.append((first, headers))
        method, target, _ = first.split(" ")
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:   # absolute URI: forward it as an origin-form request
            hostport = target.split("/")[2]
            host, port = hostport.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            origin = "/" + target.split("/", 3)[3]
            upstream.sendall(f"{method} {origin} HTTP/1.1\r\n".encode() + request.split(b"\r\n", 1)[1]
                             + b"\r\n\r\n" + rest)
        self._pipe(conn, upstream)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        def copy(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                dst.close()
        threading.Thread(target=copy, args=(b, a), daemon=True).start()
        copy(a, b)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy() -> Iterator[_Proxy]:
    p = _Proxy()
    yield p
    p.close()


def _post(url: str, ca: Path | None = None) -> bytes:
    endpoint = Endpoint.parse(url)
    pool = ConnectionPool(endpoint, connect_timeout_s=5, read_timeout_s=5, ca_bundle=str(ca) if ca else None)
    try:
        return pool.request("POST", {"Host": endpoint.host_header}, b"records").body
    finally:
        pool.close()


def test_https_goes_through_a_connect_tunnel_with_tls_checked_end_to_end(
        tls_server: tuple[int, Path], proxy: _Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    port, ca = tls_server
    monkeypatch.setenv("HTTPS_PROXY", f"http://gw:s%3Acret@127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert _post(f"https://localhost:{port}/", ca) == b"/ records"
    [(first, headers)] = proxy.seen
    assert first.startswith(f"CONNECT localhost:{port} HTTP/1.")
    assert headers["Proxy-Authorization"] == "Basic Z3c6czpjcmV0"   # gw:s:cret


def test_http_goes_to_the_proxy_as_an_absolute_uri(plain_server: int, proxy: _Proxy,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert _post(f"http://127.0.0.1:{plain_server}/") == b"/ records"
    assert proxy.seen[0][0] == f"POST http://127.0.0.1:{plain_server}/ HTTP/1.1"


def test_no_proxy_hosts_go_direct(plain_server: int, proxy: _Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,.internal")
    assert _post(f"http://127.0.0.1:{plain_server}/") == b"/ records"
    assert proxy.seen == []


def test_no_proxy_set_means_direct_and_a_tls_proxy_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert Proxy.for_endpoint(Endpoint.parse("https://kinesis.eu-west-1.amazonaws.com")) is None
    monkeypatch.setenv("HTTPS_PROXY", "https://proxy.example:3128")
    with pytest.raises(ValueError, match="HTTPS_PROXY: proxy URL"):
        Proxy.for_endpoint(Endpoint.parse("https://kinesis.eu-west-1.amazonaws.com"))


def test_a_proxy_setting_that_cannot_work_stops_the_start_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.sink.errors import AwsError
    from gateway.sink.lean import make_lean_client

    monkeypatch.setenv("HTTPS_PROXY", "https://proxy.example:3128")
    with pytest.raises(AwsError, match="HTTPS_PROXY"):
        make_lean_client("eu-west-1", environ={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
