"""The probe and metrics listener over a real socket on 127.0.0.1 (no broker, no AWS)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator

import pytest

from gateway.ops.http import HealthServer
from gateway.ops.metrics import Metrics


class Probe:
    """Scripted answers the app would compute from its threads, connection and sink."""

    def __init__(self) -> None:
        self.alive = True
        self.ready = True
        self.checks = {"routes_loaded": True, "broker_connected": True,
                       "subscriptions_granted": True, "kinesis_reachable": True}

    def liveness(self) -> bool:
        return self.alive

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        return self.ready, dict(self.checks)


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def server(probe: Probe) -> Iterator[HealthServer]:
    metrics = Metrics()
    metrics.records_put("r1", "s1", 5)
    srv = HealthServer("127.0.0.1", 0, metrics, probe.liveness, probe.readiness)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


class NoMetrics:
    def render(self) -> bytes:
        return b""


def request(server: HealthServer, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_port_zero_binds_a_free_port(server: HealthServer) -> None:
    assert server.port > 0


def test_healthz_is_200_while_threads_live_and_503_when_one_died(
        server: HealthServer, probe: Probe) -> None:
    assert request(server, "GET", "/healthz")[0] == 200
    probe.alive = False
    status, _, body = request(server, "GET", "/healthz")
    assert status == 503 and json.loads(body) == {"status": "failed"}


def test_healthz_does_not_depend_on_readiness(server: HealthServer, probe: Probe) -> None:
    probe.ready = False
    probe.checks["broker_connected"] = False
    assert request(server, "GET", "/healthz")[0] == 200


def test_readyz_reports_each_check_and_503_when_not_ready(server: HealthServer,
                                                          probe: Probe) -> None:
    status, headers, body = request(server, "GET", "/readyz")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["checks"]["kinesis_reachable"] is True
    probe.ready = False
    probe.checks["kinesis_reachable"] = False
    status, _, body = request(server, "GET", "/readyz")
    assert status == 503
    assert json.loads(body) == {"status": "not ready", "checks": {
        "routes_loaded": True, "broker_connected": True, "subscriptions_granted": True,
        "kinesis_reachable": False}}


def test_a_raising_probe_counts_as_failing_without_echoing_the_error() -> None:
    def boom() -> tuple[bool, dict[str, bool]]:
        raise RuntimeError("password=hunter2")

    status, _, body = HealthServer("127.0.0.1", 0, NoMetrics(), boom, boom).answer("/readyz")
    assert status == 503 and b"hunter2" not in body
    assert HealthServer("127.0.0.1", 0, NoMetrics(), boom, boom).answer("/healthz")[0] == 503


def test_metrics_serves_the_text_exposition(server: HealthServer) -> None:
    status, headers, body = request(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b'mqtt_kinesis_gateway_records_put_total{route="r1",stream="s1"} 5.0' in body


def test_query_strings_are_ignored(server: HealthServer) -> None:
    assert request(server, "GET", "/healthz?verbose=1")[0] == 200


def test_head_returns_headers_without_a_body(server: HealthServer) -> None:
    status, headers, body = request(server, "HEAD", "/readyz")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


@pytest.mark.parametrize("path", ["/", "/metrics/", "/health", "/readyz/x", "/../etc/passwd"])
def test_other_paths_are_404(server: HealthServer, path: str) -> None:
    assert request(server, "GET", path)[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
def test_other_methods_are_405_with_allow(server: HealthServer, method: str) -> None:
    status, headers, _ = request(server, method, "/metrics")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_requests_are_not_logged_to_stderr(server: HealthServer,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    request(server, "GET", "/healthz")
    request(server, "GET", "/nope")
    assert capfd.readouterr().err == ""


def test_stop_releases_the_port(probe: Probe) -> None:
    srv = HealthServer("127.0.0.1", 0, NoMetrics(), probe.liveness, probe.readiness)
    srv.start()
    port = srv.port
    srv.stop()
    again = HealthServer("127.0.0.1", port, NoMetrics())
    again.start()
    again.stop()


def test_port_in_use_names_the_address(server: HealthServer) -> None:
    other = HealthServer("127.0.0.1", server.port, NoMetrics())
    with pytest.raises(OSError, match=f"HTTP listener 127.0.0.1:{server.port}"):
        other.start()


def test_stop_is_safe_before_start_and_twice() -> None:
    srv = HealthServer("127.0.0.1", 0, NoMetrics())
    srv.stop()
    srv.start()
    srv.stop()
    srv.stop()


def test_metrics_can_be_given_as_a_render_callable() -> None:
    srv = HealthServer("127.0.0.1", 0, render_metrics=lambda: b"x 1\n")
    assert srv.answer("/metrics")[2] == b"x 1\n"


# -- bounded concurrency: a deadline per connection, a cap on open sockets, one loop thread ------

def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def stalled(port: int) -> socket.socket:
    """A connection that sent one byte of its request and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"G")
    return sock


def test_every_answer_closes_the_connection(server: HealthServer) -> None:
    assert request(server, "GET", "/healthz")[1]["Connection"] == "close"
    assert raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_client_that_stalls_mid_request_is_cut_at_the_deadline() -> None:
    srv = HealthServer("127.0.0.1", 0, NoMetrics(), request_timeout_s=0.2)
    srv.start()
    try:
        with stalled(srv.port) as sock:
            assert read_until_closed(sock) == b""  # closed by the server, with no answer
    finally:
        srv.stop()


def test_at_the_cap_the_oldest_unfinished_request_makes_room_for_a_new_one() -> None:
    srv = HealthServer("127.0.0.1", 0, NoMetrics(), max_connections=2)
    srv.start()
    try:
        with stalled(srv.port) as oldest, stalled(srv.port) as younger:
            assert raw_exchange(srv.port, b"GET /readyz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")
            assert read_until_closed(oldest) == b""
            younger.setblocking(False)
            with pytest.raises(BlockingIOError):  # still open: nothing to read, no end of stream
                younger.recv(1)
    finally:
        srv.stop()


def test_at_the_cap_with_every_connection_being_answered_a_new_one_is_closed_at_once() -> None:
    rendering, release = threading.Event(), threading.Event()

    def slow_render() -> bytes:
        rendering.set()
        release.wait(5)
        return b"x 1\n"

    srv = HealthServer("127.0.0.1", 0, render_metrics=slow_render, max_connections=1)
    srv.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as scrape:
            scrape.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            assert rendering.wait(5)
            try:
                assert raw_exchange(srv.port, b"GET /healthz HTTP/1.1\r\n\r\n") == b""
            except ConnectionResetError:
                pass  # closed before our request arrived: the same refusal
            release.set()
            assert read_until_closed(scrape).endswith(b"\r\n\r\nx 1\n")
    finally:
        release.set()
        srv.stop()


def test_a_request_head_over_the_limit_is_431(server: HealthServer) -> None:
    answer = raw_exchange(server.port, b"GET /healthz HTTP/1.1\r\nX-Filler: " + b"a" * 8200)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_a_body_over_the_limit_is_413_and_a_small_one_is_read_and_dropped(server: HealthServer) -> None:
    big = raw_exchange(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 413 ")
    small = raw_exchange(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
    assert small.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET, HEAD\r\n" in small


@pytest.mark.parametrize("head", [b"NONSENSE\r\n\r\n", b"GET /healthz HTTP/2.0\r\n\r\n",
                                  b"GET /healthz HTTP/1.1\r\nno colon\r\n\r\n",
                                  b"GET /healthz HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                                  b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"])
def test_a_malformed_request_is_400(server: HealthServer, head: bytes) -> None:
    assert raw_exchange(server.port, head).startswith(b"HTTP/1.1 400 ")


def test_a_client_that_leaves_mid_request_does_not_disturb_the_next(server: HealthServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /hea")
    assert request(server, "GET", "/healthz")[0] == 200


def test_a_raising_metrics_render_is_500_with_one_log_line_and_the_server_keeps_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bytes:
        raise RuntimeError("registry on fire")

    srv = HealthServer("127.0.0.1", 0, render_metrics=broken)
    srv.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="gateway.ops.http"):
            status, _, body = request(srv, "GET", "/metrics")
        assert status == 500 and json.loads(body) == {"error": "metrics unavailable"}
        assert [r.getMessage() for r in caplog.records] == ["rendering metrics failed"]
        assert request(srv, "GET", "/healthz")[0] == 200 and srv.alive
    finally:
        srv.stop()


def test_a_raising_probe_leaves_the_server_serving(probe: Probe) -> None:
    def boom() -> bool:
        raise RuntimeError("thread table gone")

    srv = HealthServer("127.0.0.1", 0, NoMetrics(), boom, probe.readiness)
    srv.start()
    try:
        assert request(srv, "GET", "/healthz")[0] == 503
        assert request(srv, "GET", "/readyz")[0] == 200 and srv.alive
    finally:
        srv.stop()


def test_alive_from_start_until_stop() -> None:
    srv = HealthServer("127.0.0.1", 0, NoMetrics())
    assert not srv.alive
    srv.start()
    assert srv.alive
    srv.stop()
    assert not srv.alive


def test_stop_closes_connections_still_sending_their_request() -> None:
    srv = HealthServer("127.0.0.1", 0, NoMetrics())
    srv.start()
    sock = stalled(srv.port)
    try:
        assert request(srv, "GET", "/healthz")[0] == 200  # the stalled one was accepted before this
        srv.stop()
        assert read_until_closed(sock) == b""
    finally:
        sock.close()
        srv.stop()


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        HealthServer("127.0.0.1", 0, max_connections=0)
    with pytest.raises(ValueError, match="request_timeout_s"):
        HealthServer("127.0.0.1", 0, request_timeout_s=0)
