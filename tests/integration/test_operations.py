"""Operating the gateway: what Prometheus, Kubernetes probes and a log pipeline see.

Every test runs the real process (`GatewayProcess`, so CI's GATEWAY_COMMAND runs the installed
console script) against a real Mosquitto and moto's Kinesis server, and looks only from outside:
the /metrics text parsed by prometheus_client's own parser, the probe status codes, the bytes the
process wrote to stdout and stderr. Waits poll what they wait for; nothing sleeps a fixed time.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gatewayproc import GatewayProcess
from tests.support.publisher import Publisher
from tests.support.services import HOST, Mosquitto, read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PREFIX = "mqtt_kinesis_gateway_"
# Label names a sample may carry: the bounded ones of the metrics contract, plus the fixed
# labels of prometheus_client's own shapes (histogram buckets, info values, reload results).
ALLOWED_LABELS = {"route", "stream", "reason", "result", "sha256", "version", "le"}


def _wait(predicate: Callable[[], Any], timeout: float, what: str, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _route(name: str, topic: str, stream: str, key: str = "name", qos: int = 1) -> str:
    return (f"  - name: {name}\n    topic: \"{topic}\"\n    stream: {stream}\n"
            f"    partition_key: \"{key}\"\n    qos: {qos}\n")


def _write_routes(path: Path, *routes: str) -> Path:
    path.write_text("version: 1\nroutes:\n" + "".join(routes))
    return path


def _families(gw: GatewayProcess) -> dict[str, Any]:
    status, body = gw.http_get("/metrics")
    assert status == 200, body
    return {fam.name: fam for fam in text_string_to_metric_families(body)}


def _value(families: dict[str, Any], sample: str, **labels: str) -> float | None:
    """The one sample called `sample` with exactly these route/stream labels; None if absent."""
    for fam in families.values():
        for s in fam.samples:
            if s.name == PREFIX + sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def _request(gw: GatewayProcess, method: str, path: str) -> int:
    conn = http.client.HTTPConnection(HOST, gw.http_port, timeout=5)
    try:
        conn.request(method, path, body=b"{}" if method in ("POST", "PUT", "PATCH") else None)
        return conn.getresponse().status
    finally:
        conn.close()


# -- (a) metrics after a real run --------------------------------------------------------------

def test_metrics_count_every_route_with_traffic_and_label_only_route_stream_reason(
        tmp_path: Path, make_stream: Callable[..., str], kinesis: Any,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    s_weld, s_press = make_stream(suffix="-weld"), make_stream(suffix="-press")
    routes = _write_routes(
        tmp_path / "routes.yaml",
        _route("welders", "plant/+/welder/#", s_weld),
        _route("presses", "plant/+/press/#", s_press, key="topic(`2`)"),
        _route("idle", "plant/+/idle/#", s_weld),
    )
    gw = gateway_process(routes)
    counts = {"welders": 40, "presses": 25}
    topics = {"welders": "plant/line-7/welder/w-secret-topic", "presses": "plant/line-9/press/p1"}
    for route, n in counts.items():
        pub = publisher(topic=topics[route])
        pub.publish_range(n)
        assert pub.wait_acked(10), f"broker did not ack {route}"
    bad = publisher(topic=topics["welders"], payload=lambda seq: b"not json at all")
    bad.publish(0)
    assert bad.wait_acked(10)

    def delivered() -> bool:
        fams = _families(gw)
        return (_value(fams, "records_put_total", route="welders", stream=s_weld) == counts["welders"]
                and _value(fams, "records_put_total", route="presses", stream=s_press) == counts["presses"]
                and (_value(fams, "records_dropped_total", route="welders", reason="not_json") or 0) >= 1)
    _wait(delivered, 20, "every record put and the bad payload dropped")
    fams = _families(gw)

    # Non-zero per-route counters, matching what Kinesis holds, for each route that had traffic.
    assert _value(fams, "messages_received_total", route="welders") == counts["welders"] + 1
    assert _value(fams, "messages_received_total", route="presses") == counts["presses"]
    assert len(read_all(kinesis, s_weld)) == counts["welders"]
    assert len(read_all(kinesis, s_press)) == counts["presses"]
    # The route without traffic is declared at zero, so alerts and rates work before traffic.
    assert _value(fams, "messages_received_total", route="idle") == 0
    assert _value(fams, "records_put_total", route="idle", stream=s_weld) == 0
    assert _value(fams, "records_dropped_total", route="welders", reason="not_json") == 1
    assert (_value(fams, "batch_records_count", stream=s_weld) or 0) >= 1
    assert _value(fams, "mqtt_connected") == 1 and _value(fams, "backlog_records") == 0

    # Labels: only the bounded names, and never a topic, a topic level or a partition key.
    forbidden_values = set(topics.values()) | {"line-7", "line-9", "w-secret-topic", "p1"} \
        | {f"device{i}" for i in range(7)}
    for fam in fams.values():
        assert fam.name.startswith(PREFIX), fam.name
        for s in fam.samples:
            assert set(s.labels) <= ALLOWED_LABELS, (s.name, s.labels)
            assert not set(s.labels.values()) & forbidden_values, (s.name, s.labels)
            for name in ("route", "stream", "reason"):
                assert name not in s.labels or s.labels[name] not in forbidden_values


# -- (b) readiness follows the broker, liveness does not ---------------------------------------

def test_readiness_follows_the_broker_while_liveness_stays_ok(
        kinesis_stream: str, tmp_path: Path, mosquitto: Mosquitto,
        gateway_process: Callable[..., GatewayProcess]) -> None:
    routes = _write_routes(tmp_path / "routes.yaml", _route("welders", "plant/+/welder/#", kinesis_stream))
    gw = gateway_process(routes, extra_env={"MQTT_RECONNECT_MIN_S": "0.2", "MQTT_RECONNECT_MAX_S": "1"})
    liveness: list[int] = []

    def probe(expect_ready: bool) -> bool:
        liveness.append(gw.http_get("/healthz")[0])
        status, body = gw.http_get("/readyz")
        if expect_ready:
            return status == 200
        return status == 503 and json.loads(body)["checks"]["broker_connected"] is False

    assert probe(True)
    t0 = time.monotonic()
    mosquitto.stop()
    _wait(lambda: probe(False), 10, "/readyz to turn 503 with broker_connected false")
    t_unready = time.monotonic() - t0
    assert gw.metric("mqtt_connected") == 0
    # Stay down for a while: liveness must not flip on a broker outage (no restart storm).
    down_until = time.monotonic() + 1.5
    while time.monotonic() < down_until:
        assert not probe(True)
        time.sleep(0.1)
    t1 = time.monotonic()
    mosquitto.start()  # same port, same config
    _wait(lambda: probe(True), 15, "/readyz to return to 200")
    t_ready = time.monotonic() - t1
    assert gw.alive and gw.starts == 1
    assert gw.metric("mqtt_connected") == 1
    assert liveness and set(liveness) == {200}, liveness
    print(f"\nreadiness: not ready {t_unready:.2f} s after the broker stopped, ready "
          f"{t_ready:.2f} s after it returned; /healthz 200 on all {len(liveness)} probes")


# -- (c) no secret and no payload in the logs ------------------------------------------------

MQTT_PASSWORD = "pw-S3cr3t-Zebra-42"
AWS_SECRET = "aws-S3cr3t-Okapi-77/Xyz+Q"
MARKER = "PAYLOAD-MARKER-Quokka-9137"


@pytest.mark.parametrize("password_source", ["env", "file"])
def test_no_secret_and_no_payload_reaches_the_logs(
        password_source: str, tmp_path: Path, make_stream: Callable[..., str],
        mosquitto_factory: Callable[..., Mosquitto], gateway_process: Callable[..., GatewayProcess],
        publisher: Callable[..., Publisher]) -> None:
    stream = make_stream()
    broker = mosquitto_factory(passwords={"gateway": MQTT_PASSWORD, "sensor": "sensor-pw-1"},
                               allow_anonymous=False)
    routes = _write_routes(tmp_path / "routes.yaml", _route("welders", "plant/+/welder/#", stream))
    env = {"MQTT_USERNAME": "gateway", "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "MQTT_RECONNECT_MIN_S": "0.2", "MQTT_RECONNECT_MAX_S": "1", "LOG_LEVEL": "DEBUG"}
    if password_source == "env":
        env["MQTT_PASSWORD"] = MQTT_PASSWORD
    else:
        secret = tmp_path / "mqtt-password"
        secret.write_text(MQTT_PASSWORD + "\n")
        env["MQTT_PASSWORD_FILE"] = str(secret)
    gw = gateway_process(routes, mqtt_port=broker.port, extra_env=env)

    def payload(seq: int) -> bytes:
        if seq == 5:
            return f"not json {MARKER}".encode()  # rejected: payload is not JSON
        if seq == 6:
            return json.dumps({"seq": seq, "note": MARKER}).encode()  # rejected: no key
        return json.dumps({"name": f"dev-{seq}", "seq": seq, "note": MARKER}).encode()

    pub = publisher(port=broker.port, topic="plant/l1/welder/w1", payload=payload,
                    username="sensor", password="sensor-pw-1")
    pub.publish_range(10)
    assert pub.wait_acked(10)
    _wait(lambda: gw.metric("records_put_total") == 8
          and gw.metric("records_dropped_total") == 2, 20, "8 records put and 2 dropped")
    pub.close()

    # A reconnect through the error paths: disconnected, connection refused (logged with host and
    # port, the line most tempted to show a connection string), connected again.
    broker.stop()
    _wait(lambda: "cannot connect to MQTT broker" in gw.stdout_text() + gw.stderr_text(), 10,
          "the refused-connection log line")
    broker.start()
    _wait(lambda: gw.metric("mqtt_connected") == 1 and gw.http_get("/readyz")[0] == 200, 15,
          "the gateway to reconnect")
    pub2 = publisher(port=broker.port, topic="plant/l1/welder/w1", payload=payload,
                     username="sensor", password="sensor-pw-1")
    pub2.publish_range(range(5, 7))  # the two rejections again, on the new connection
    assert pub2.wait_acked(10)
    _wait(lambda: gw.metric("records_dropped_total") == 4, 20, "the second two rejections")
    metrics_text = gw.http_get("/metrics")[1]
    assert gw.terminate() == 0

    output = gw.stdout_text() + gw.stderr_text()
    messages = " ".join(str(e.get("message", e.get("raw", ""))) for e in gw.logs())
    # The run did log the paths we care about, so the absence below means something.
    assert "connected to MQTT broker" in messages
    assert "disconnected from MQTT broker" in messages and "cannot connect" in messages
    assert "rejected by route" in messages or "dropped a message" in messages
    for secret in (MQTT_PASSWORD, AWS_SECRET, MARKER, "S3cr3t"):
        assert secret not in output, f"{secret!r} appears in the gateway's output"
        assert secret not in metrics_text, f"{secret!r} appears in /metrics"
    # Nothing even needed the redaction net: no line tried to print a registered secret.
    assert "***" not in output, [line for line in output.splitlines() if "***" in line][:3]
    assert broker.log_text()  # the broker logged too; the gateway's client id is fine to see
    print(f"\nsecrets ({password_source}): {len(output.splitlines())} log lines searched, "
          "no password, AWS secret or payload marker")


# -- (d) the HTTP listener serves three paths and nothing else ----------------------------------

def test_http_listener_serves_only_health_ready_and_metrics(
        kinesis_stream: str, tmp_path: Path, gateway_process: Callable[..., GatewayProcess]) -> None:
    routes = _write_routes(tmp_path / "routes.yaml", _route("welders", "plant/+/welder/#", kinesis_stream))
    gw = gateway_process(routes)
    for path in ("/healthz", "/readyz", "/metrics", "/healthz?verbose=1"):
        assert _request(gw, "GET", path) == 200, path
        assert _request(gw, "HEAD", path) == 200, path
    for path in ("/", "/health", "/healthz/", "/metrics/x", "/ready", "/admin", "/debug/vars",
                 "/../etc/passwd", "/%2e%2e/", "/METRICS"):
        assert _request(gw, "GET", path) == 404, path
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        for path in ("/healthz", "/readyz", "/metrics", "/nope"):
            assert _request(gw, method, path) == 405, (method, path)
    status, body = gw.http_get("/readyz")
    assert status == 200 and set(json.loads(body)) == {"status", "checks"}
    assert gw.alive
