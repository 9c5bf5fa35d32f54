"""What a new user reads first: start-up failures, ignored settings, QoS 0 at start and at shutdown.

Each start-up failure is one line in the log format in force (JSON here), on the log's channel
(stdout), with exit 2 and the setting to change named in it; never "internal error".
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.gatewayproc import GatewayProcess
from tests.support.services import Mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def routes_file(tmp_path: Path, stream: str, qos: int = 1) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(f"""\
version: 1
routes:
  - name: sensors
    topic: sensors/#
    stream: {stream}
    partition_key: topic()
    qos: {qos}
""", encoding="utf-8")
    return path


def only_line(gw: GatewayProcess) -> dict[str, object]:
    lines = [line for line in gw.stdout_text().splitlines() if line.strip()]
    assert len(lines) == 1, gw.output_tail()
    assert gw.stderr_text() == ""
    return json.loads(lines[0])


def test_no_region_is_one_line_naming_aws_region_and_exit_2(
        gateway_process: Callable[..., GatewayProcess], tmp_path: Path, kinesis_stream: str) -> None:
    gw = gateway_process(routes_file(tmp_path, kinesis_stream), ready=False,
                         extra_env={"AWS_REGION": None, "AWS_DEFAULT_REGION": None})
    assert gw.wait_exit(30) == 2
    errors = [r for r in gw.logs() if r.get("level") == "ERROR"]
    assert len(errors) == 1 and "AWS_REGION" in str(errors[0]["message"]), gw.output_tail()
    assert "internal error" not in gw.stdout_text() + gw.stderr_text()


def test_http_port_taken_is_one_line_naming_http_port_and_exit_2(
        gateway_process: Callable[..., GatewayProcess], tmp_path: Path, kinesis_stream: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = gateway_process(routes_file(tmp_path, kinesis_stream), ready=False, http_port=port)
        assert gw.wait_exit(30) == 2
    errors = [r for r in gw.logs() if r.get("level") == "ERROR"]
    assert len(errors) == 1 and "HTTP_PORT" in str(errors[0]["message"]), gw.output_tail()
    assert "internal error" not in gw.stdout_text() + gw.stderr_text()


@pytest.mark.parametrize(("qos", "says"), [("2", "QoS 2 is not supported"), ("one", "expected 0 or 1")])
def test_a_bad_qos_in_the_env_file_names_the_file_and_line(
        gateway_process: Callable[..., GatewayProcess], tmp_path: Path, qos: str, says: str) -> None:
    env = tmp_path / "bridge.env"
    env.write_text(f" TOPIC=sensors/#\n KIN_STREAM_NAME=s\n QOS={qos}\n", encoding="utf-8")
    gw = gateway_process(None, env_file=env, ready=False)
    assert gw.wait_exit(30) == 2
    message = str(only_line(gw)["message"])
    assert f"{env}:3" in message and "QOS" in message and says in message


def test_settings_a_route_file_overrides_are_named_at_start_with_the_env_file_read(
        gateway_process: Callable[..., GatewayProcess], tmp_path: Path, kinesis_stream: str) -> None:
    env = tmp_path / "bridge.env"
    env.write_text(" TOPIC=sensors/#\n QOS=0\n WEBSOCKET=8080\n", encoding="utf-8")
    gw = gateway_process(routes_file(tmp_path, kinesis_stream), env_file=env)
    messages = [str(r["message"]) for r in gw.logs()]
    assert any(str(env) in m and "settings read" in m for m in messages)
    for name in ("TOPIC", "QOS", "WEBSOCKET"):
        assert any(m.startswith(f"{name} is ignored") for m in messages), name


def test_qos0_is_named_at_start_and_shutdown_never_promises_its_redelivery(
        gateway_process: Callable[..., GatewayProcess], mosquitto: Mosquitto, publisher: Callable[..., object],
        tmp_path: Path) -> None:
    gw = gateway_process(routes_file(tmp_path, "no-such-stream", qos=0), ready=False,
                         extra_env={"GATEWAY_SHUTDOWN_TIMEOUT_S": "3"})
    deadline = time.monotonic() + 20  # not ready (the stream is missing): wait for the subscription
    while time.monotonic() < deadline and gw.metric("subscriptions_granted") < 1:
        time.sleep(0.1)
    assert any("QoS 0" in str(r["message"]) and "sensors" in str(r["message"]) for r in gw.logs())
    pub = publisher(topic="sensors/1", qos=0)
    pub.publish_range(5)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and gw.metric("messages_received_total", route="sensors") < 5:
        time.sleep(0.1)
    gw.signal(signal.SIGTERM)
    gw.wait_exit(30)
    last = [str(r["message"]) for r in gw.logs() if "stopped" in str(r["message"])]
    assert last and "QoS 0 messages are lost" in last[-1] and "redelivers the QoS 1" not in last[-1], last


@pytest.mark.parametrize("case", ["closed endpoint", "missing stream"])
def test_readyz_is_503_naming_the_stream_within_5s_with_no_message_sent(
        gateway_process: Callable[..., GatewayProcess], tmp_path: Path, kinesis_stream: str, case: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    stream = kinesis_stream if case == "closed endpoint" else "no-such-stream"
    extra = {"AWS_ENDPOINT_URL_KINESIS": closed_url} if case == "closed endpoint" else {}
    gw = gateway_process(routes_file(tmp_path, stream), ready=False, extra_env=extra)
    deadline = time.monotonic() + 5
    body: dict[str, object] = {}
    while time.monotonic() < deadline:
        status, text = gw.http_get("/readyz")
        if status == 503 and text:
            body = json.loads(text)
            if stream in json.dumps(body.get("problems", {})) and "not checked" not in json.dumps(body):
                break
        time.sleep(0.1)
    assert body.get("status") == "not ready", gw.output_tail()
    assert body["checks"]["kinesis_reachable"] is False  # type: ignore[index]
    assert stream in json.dumps(body.get("problems")), body
    assert gw.http_get("/readyz")[0] == 503
    failures = [str(r["message"]) for r in gw.logs() if "check failed" in str(r["message"])]
    assert len(failures) == 1 and stream in failures[0]  # the first failure, once, in one line
    if case == "closed endpoint":
        assert closed_url in failures[0]  # the line names the endpoint it could not reach


def test_a_wrong_broker_port_keeps_saying_so_while_it_lasts(
        gateway_process: Callable[..., GatewayProcess], tmp_path: Path, kinesis_stream: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    gw = gateway_process(routes_file(tmp_path, kinesis_stream), ready=False, mqtt_port=port,
                         extra_env={"MQTT_RECONNECT_MAX_S": "1"})

    def lines() -> list[str]:
        return [str(r["message"]) for r in gw.logs() if "connect to MQTT broker" in str(r["message"])]

    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and not any(m.startswith("still cannot connect") for m in lines()):
        time.sleep(0.2)
    found = lines()
    assert found and found[0].startswith(f"cannot connect to MQTT broker 127.0.0.1:{port}"), gw.output_tail()
    assert any(m.startswith(f"still cannot connect to MQTT broker 127.0.0.1:{port} after") for m in found), found
    assert len(found) <= 4   # a line every 10 s, not one per attempt
