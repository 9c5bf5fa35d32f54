"""Secrets stay secret, the HTTP listener is read-only, and a route file cannot reach other files.

Secrets: the MQTT password (from MQTT_PASSWORD or a mounted MQTT_PASSWORD_FILE) and the AWS secret
key must never appear in the gateway's output, /metrics or health bodies, or a settings error,
whether the broker refuses the password or accepts it; logging runs at DEBUG so paho's own lines
are searched too.

Route files: the loader composes YAML nodes itself (no object construction) and the schema
forbids unknown keys, so a route file has no way to name another file (`include`, `$ref`) or to
run code (`!!python/...` tags); loading opens nothing. These checks need no broker; they sit here
because they are part of the security promise in SECURITY.md.
"""

from __future__ import annotations

import builtins
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from gateway.routefile.loader import load_routes_text
from gateway.settings.settings import SettingsError, load_settings
from tests.support.gatewayproc import GatewayProcess
from tests.support.services import Mosquitto, wait_for_records

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RIGHT = "Right-Pw-91c2e7d4-mqtt"
WRONG = "Wrong-Pw-5b8a0f13-mqtt"
AWS_SECRET = "AwsSecret-3e9d1c77b2-not-real"

ROUTE = """\
version: 1
routes:
  - name: sec
    topic: "sec/#"
    stream: {stream}
    partition_key: "topic()"
"""


def _everything_it_said(gw: GatewayProcess) -> str:
    bodies = [gw.http_get(p)[1] for p in ("/metrics", "/healthz", "/readyz")]
    return "\n".join([gw.stdout_text(), gw.stderr_text(), *bodies])


def _assert_no_secret(text: str) -> None:
    for secret in (RIGHT, WRONG, AWS_SECRET):
        assert secret not in text, f"secret {secret[:8]}... leaked"
        assert secret[:12] not in text, f"a prefix of secret {secret[:8]}... leaked"


def test_passwords_and_aws_secret_never_appear_in_output_metrics_or_health(
        mosquitto_factory: Callable[..., Mosquitto], kinesis_stream: str, kinesis: Any,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Any],
        tmp_path: Path) -> None:
    broker = mosquitto_factory(allow_anonymous=False, passwords={"gw": RIGHT, "pub": "pub-pw-1"})
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTE.format(stream=kinesis_stream))
    common = {"MQTT_USERNAME": "gw", "LOG_LEVEL": "DEBUG", "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
              "MQTT_RECONNECT_MIN_S": "0.2", "MQTT_RECONNECT_MAX_S": "0.5"}

    # 1. wrong password from the environment: refused, retried, reported without the value
    wrong = gateway_process(routes, mqtt_port=broker.port, ready=False, client_id="gw-wrong",
                            extra_env={**common, "MQTT_PASSWORD": WRONG})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "refused" not in wrong.stdout_text() + wrong.stderr_text():
        time.sleep(0.2)
    time.sleep(1.0)
    said = _everything_it_said(wrong)
    assert "refused" in said, wrong.output_tail()
    assert wrong.http_get("/readyz")[0] == 503
    _assert_no_secret(said)
    wrong.terminate()
    _assert_no_secret(wrong.stdout_text() + wrong.stderr_text())

    # 2. right password from a mounted file: connects and delivers, still never shows it
    secret_file = tmp_path / "mqtt-password"
    secret_file.write_text(RIGHT + "\n")
    right = gateway_process(routes, mqtt_port=broker.port, client_id="gw-right",
                            extra_env={**common, "MQTT_PASSWORD_FILE": str(secret_file)})
    pub = publisher(port=broker.port, topic="sec/a", username="pub", password="pub-pw-1")
    pub.publish_range(20)
    assert pub.wait_acked(20)
    assert len(wait_for_records(kinesis, kinesis_stream, 20, timeout=30)) >= 20
    _assert_no_secret(_everything_it_said(right))
    right.terminate()
    _assert_no_secret(right.stdout_text() + right.stderr_text())


def test_settings_errors_name_the_variable_never_the_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(RIGHT)
    base = {"GATEWAY_ROUTES": str(tmp_path / "routes.yaml"), "MQTT_USERNAME": "gw",
            "MQTT_HOST": "broker.example"}
    cases = [
        ("MQTT_PASSWORD", {**base, "MQTT_PASSWORD": RIGHT, "MQTT_PASSWORD_FILE": str(secret_file)}),
        ("MQTT_PASSWORD_FILE", {**base, "MQTT_PASSWORD_FILE": str(tmp_path / "missing")}),
        ("MQTT_HOST", {**base, "MQTT_PASSWORD": RIGHT, "MQTT_HOST": f"mqtt://gw:{RIGHT}@broker"}),
        ("MQTT_PORT", {**base, "MQTT_PASSWORD": RIGHT, "MQTT_PORT": "not-a-port"}),
    ]
    for name, env in cases:
        with pytest.raises(SettingsError) as caught:
            load_settings(env)
        message = str(caught.value)
        assert message.startswith(name), (name, message)
        assert "\n" not in message and RIGHT not in message and RIGHT[:12] not in message, message
    ok = load_settings({**base, "MQTT_PASSWORD_FILE": str(secret_file)})
    assert RIGHT not in repr(ok) and RIGHT not in str(ok)


def test_http_listener_serves_only_its_three_read_only_paths(
        mosquitto: Mosquitto, kinesis_stream: str, gateway_process: Callable[..., GatewayProcess],
        tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTE.format(stream=kinesis_stream))
    gw = gateway_process(routes)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert gw.http_get(path)[0] == 200
    for path in ("/", "/metrics/../../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/routes.yaml",
                 "/debug", "/config", "/env", "//metrics.bak"):
        status, body = gw.http_get(path)
        assert status == 404, (path, status)
        assert "root:" not in body and "version: 1" not in body
    import urllib.error
    import urllib.request
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        req = urllib.request.Request(f"http://127.0.0.1:{gw.http_port}/metrics", data=b"x",
                                     method=method)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=2)
        assert caught.value.code == 405, method


# --- route files cannot reach other files or run code ---------------------------------------------

GOOD = ROUTE.format(stream="s1")
HOSTILE = {
    "include": GOOD + "include: /etc/passwd\n",
    "ref-top": GOOD + '"$ref": "file:///etc/passwd"\n',
    "ref-route": GOOD + '    "$ref": "file:///etc/passwd"\n',
    "route-file-key": GOOD + "    file: /etc/passwd\n",
    "stream-path": ROUTE.format(stream="/etc/passwd"),
    "python-object": GOOD + "x: !!python/object/apply:os.system ['touch {marker}']\n",
    "python-name": "version: 1\nroutes: !!python/name:os.system\n",
    "python-module": GOOD + "y: !!python/module:os\n",
    "custom-include": "version: 1\nroutes: !include /etc/passwd\n",
    "binary": GOOD + "z: !!binary aGVsbG8=\n",
    "merge-alias-bomb": "version: 1\n" + "".join(
        f"{k}: &{k} [{', '.join([prev] * 10)}]\n"
        for k, prev in zip("abcdef", ["x", "*a", "*b", "*c", "*d", "*e"])) + "routes: []\n",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_route_file_cannot_name_files_or_run_code_and_loading_opens_nothing(
        case: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = HOSTILE[case].format(marker=marker) if "{marker}" in HOSTILE[case] else HOSTILE[case]
    assert load_routes_text(GOOD, "warm.yaml").ok  # the packaged schema is read once, up front
    opened: list[Any] = []

    def spy(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            opened.append(args[:1])
            return real(*args, **kwargs)
        return wrapper

    with mock.patch.object(builtins, "open", spy(builtins.open)), \
            mock.patch.object(io, "open", spy(io.open)), \
            mock.patch.object(os, "open", spy(os.open)), \
            mock.patch.object(os, "system", spy(os.system)):
        started = time.monotonic()
        result = load_routes_text(text, "hostile.yaml")
        elapsed = time.monotonic() - started
    assert not result.ok and result.table is None, [f.format_text() for f in result.findings]
    assert opened == [], f"loading a route file opened {opened}"
    assert not marker.exists()
    assert elapsed < 5, f"took {elapsed:.1f}s"
    for finding in result.findings:
        assert finding.file == "hostile.yaml" and finding.line >= 1 and "\n" not in finding.message
        assert "root:" not in finding.message
