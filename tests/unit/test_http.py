"""The probe and metrics listener over a real socket on 127.0.0.1 (no broker, no AWS)."""

from __future__ import annotations

import http.client
import json
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
