"""TLS and authentication against a real Mosquitto (docs/delivery.md#how-the-guarantees-are-tested).

What the gateway promises: certificate verification is on by default; a broker it cannot trust
(unknown CA, expired certificate) or a listener it cannot speak to (plain MQTT to a TLS port) is
refused with one clear log line, the gateway stays up but never ready, and it retries with a
capped backoff rather than spinning; mTLS with a client certificate works; a refused password
that is fixed on the broker side is picked up by reconnecting, without restarting the gateway,
and a persistent session means nothing published meanwhile is lost.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.certs import Pki
from tests.support.gatewayproc import GatewayProcess
from tests.support.oracle import check_delivery
from tests.support.services import Mosquitto, TlsFiles, wait_for_records

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OBSERVE_S = 5.0          # how long a refused gateway is watched
MAX_CPU_S = 0.5          # CPU it may use meanwhile: retrying, not spinning
FAST_RECONNECT = {"MQTT_RECONNECT_MIN_S": "0.2", "MQTT_RECONNECT_MAX_S": "1"}


def _routes(tmp_path: Path, stream: str) -> Path:
    path = tmp_path / "routes.yaml"
    path.write_text(f"""\
version: 1
routes:
  - name: secure
    topic: "secure/#"
    stream: {stream}
    partition_key: "topic()"
    qos: 1
""")
    return path


def _tls_broker(factory: Callable[..., Mosquitto], pki: Pki, *, expired: bool = False,
                **kw: Any) -> Mosquitto:
    pair = pki.expired_server if expired else pki.server
    return factory(tls=TlsFiles(pki.ca, pair.cert, pair.key), **kw)


def _error_lines(gw: GatewayProcess, needle: str) -> list[str]:
    return [str(e.get("message", e.get("raw", ""))) for e in gw.logs()
            if needle.lower() in str(e.get("message", e.get("raw", ""))).lower()]


def _assert_refused_quietly(gw: GatewayProcess, needle: str | None) -> list[str]:
    """Alive, never ready, no traceback, bounded CPU while retrying; returns the log lines that
    contain `needle` (the test decides what it expects of them)."""
    time.sleep(1.5)  # past start-up (imports cost CPU), into the retry loop
    assert gw.alive, gw.output_tail()
    proc = psutil.Process(gw.pid)
    before = proc.cpu_times()
    start = time.monotonic()
    readies = []
    while time.monotonic() - start < OBSERVE_S:
        readies.append(gw.http_get("/readyz")[0])
        time.sleep(0.5)
    after = proc.cpu_times()
    cpu = (after.user - before.user) + (after.system - before.system)
    assert gw.alive, gw.output_tail()
    assert set(readies) == {503}, readies
    assert cpu < MAX_CPU_S, f"gateway used {cpu:.2f}s CPU in {OBSERVE_S}s while refused: spinning?"
    print(f"[tls] refused gateway used {cpu:.3f}s CPU over {OBSERVE_S:.0f}s")
    assert "Traceback" not in gw.stderr_text() + gw.stdout_text()
    assert gw.metric("mqtt_connected") == 0
    return _error_lines(gw, needle) if needle else []


def _assert_one_line(gw: GatewayProcess, lines: list[str], needle: str) -> None:
    assert len(lines) == 1, f"expected one line naming {needle!r}, got {lines}\n{gw.output_tail()}"


def test_unknown_ca_is_refused_with_one_line_and_bounded_backoff(
        mosquitto_factory: Callable[..., Mosquitto], test_pki: Pki, kinesis_stream: str,
        gateway_process: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    broker = _tls_broker(mosquitto_factory, test_pki)
    gw = gateway_process(_routes(tmp_path, kinesis_stream), mqtt_port=broker.tls_port, ready=False,
                         extra_env={"MQTT_TLS": "true", "MQTT_TLS_CA_FILE": str(test_pki.other_ca),
                                    **FAST_RECONNECT})
    lines = _assert_refused_quietly(gw, "certificate verification failed")
    _assert_one_line(gw, lines, "certificate verification failed")
    assert any(why in lines[0] for why in ("unable to get local issuer certificate",
                                           "self-signed certificate in certificate chain")), lines
    # it did retry (backoff, not give-up): the broker saw more than one TLS handshake attempt
    time.sleep(0.5)
    # Mosquitto logs each refused handshake once, in one of two words depending on when the
    # client's alert arrives: "Client connection from ... failed: ...unknown ca" (often with no
    # "New connection" line before it) or "OpenSSL Error[0]: ...unknown ca" (after one). Count those.
    attempts = [line for line in broker.log_text().splitlines()
                if "unknown ca" in line and ("Client connection from 127.0.0.1 failed" in line
                                             or "OpenSSL Error" in line)]
    assert len(attempts) >= 3, broker.log_text()[-2000:]


def test_expired_server_certificate_is_refused(
        mosquitto_factory: Callable[..., Mosquitto], test_pki: Pki, kinesis_stream: str,
        gateway_process: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    broker = _tls_broker(mosquitto_factory, test_pki, expired=True)
    gw = gateway_process(_routes(tmp_path, kinesis_stream), mqtt_port=broker.tls_port, ready=False,
                         extra_env={"MQTT_TLS_CA_FILE": str(test_pki.ca), **FAST_RECONNECT})
    lines = _assert_refused_quietly(gw, "certificate verification failed")
    _assert_one_line(gw, lines, "certificate verification failed")
    assert "expired" in lines[0], lines


def test_plain_mqtt_to_a_tls_port_is_refused_with_a_clear_error(
        mosquitto_factory: Callable[..., Mosquitto], test_pki: Pki, kinesis_stream: str,
        gateway_process: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    broker = _tls_broker(mosquitto_factory, test_pki)
    gw = gateway_process(_routes(tmp_path, kinesis_stream), mqtt_port=broker.tls_port, ready=False,
                         extra_env={"MQTT_TLS": "false", **FAST_RECONNECT})
    _assert_refused_quietly(gw, None)
    attempts = broker.log_text().count("wrong version number")  # the broker saw plain MQTT
    assert 3 <= attempts <= 2 * (OBSERVE_S + 3) / 0.2, attempts  # retried, with a floor between tries
    lines = _error_lines(gw, "cannot connect to MQTT broker")
    _assert_one_line(gw, lines, "cannot connect to MQTT broker")
    assert "MQTT_TLS" in lines[0], lines
    assert not _error_lines(gw, "connection reset by peer"), "paho's per-retry lines are not repeated"


def test_mutual_tls_with_a_client_certificate_delivers(
        mosquitto_factory: Callable[..., Mosquitto], test_pki: Pki, kinesis_stream: str, kinesis: Any,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Any],
        tmp_path: Path) -> None:
    broker = _tls_broker(mosquitto_factory, test_pki, require_certificate=True)
    routes = _routes(tmp_path, kinesis_stream)
    # without a client certificate the broker refuses the handshake
    bare = gateway_process(routes, mqtt_port=broker.tls_port, ready=False, client_id="gw-no-cert",
                           extra_env={"MQTT_TLS_CA_FILE": str(test_pki.ca), **FAST_RECONNECT})
    time.sleep(3)
    assert bare.alive and bare.http_get("/readyz")[0] == 503
    bare.terminate()
    # with one (MQTT_TLS is implied by the CA file), it connects, subscribes and delivers
    gw = gateway_process(routes, mqtt_port=broker.tls_port,
                         extra_env={"MQTT_TLS_CA_FILE": str(test_pki.ca),
                                    "MQTT_TLS_CERT_FILE": str(test_pki.client.cert),
                                    "MQTT_TLS_KEY_FILE": str(test_pki.client.key)})
    pub = publisher(port=broker.port, topic="secure/line1")  # plain listener for the publisher
    pub.publish_range(100)
    assert pub.wait_acked(20)
    report = check_delivery(pub.acked, wait_for_records(kinesis, kinesis_stream, 100, timeout=30))
    report.assert_no_loss()
    assert report.acked == 100
    assert not _error_lines(gw, "certificate")


def test_bad_password_recovers_after_the_broker_is_fixed_without_restart_or_loss(
        mosquitto_factory: Callable[..., Mosquitto], kinesis_stream: str, kinesis: Any,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Any],
        tmp_path: Path) -> None:
    password = "gw-Secret-7f3a9c"
    broker = mosquitto_factory(allow_anonymous=False, persistence=True,
                               passwords={"gateway": password, "publisher": "pub-pass-1"})
    secret_file = tmp_path / "mqtt-password"
    secret_file.write_text(password + "\n")
    gw = gateway_process(_routes(tmp_path, kinesis_stream), mqtt_port=broker.port,
                         extra_env={"MQTT_USERNAME": "gateway",
                                    "MQTT_PASSWORD_FILE": str(secret_file), **FAST_RECONNECT})
    pub = publisher(port=broker.port, topic="secure/a", username="publisher", password="pub-pass-1")
    pub.publish_range(range(50))
    assert pub.wait_acked(20)
    assert len(wait_for_records(kinesis, kinesis_stream, 50, timeout=30)) >= 50
    pub.close()

    # the broker's password for the gateway changes under it; the broker restarts (session saved)
    pwfile = broker.dir / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "gateway", "rotated-elsewhere"], check=True)
    broker.restart()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not _error_lines(gw, "broker refused the connection"):
        time.sleep(0.2)
    refused = _error_lines(gw, "broker refused the connection")
    assert refused, gw.output_tail()
    assert gw.http_get("/readyz")[0] == 503
    # messages published while the gateway is locked out wait in its persistent session
    pub2 = publisher(port=broker.port, topic="secure/b", username="publisher", password="pub-pass-1")
    pub2.publish_range(range(50, 150))
    assert pub2.wait_acked(20)

    # the fix: the broker takes the gateway's password again (reloaded on SIGHUP, no restart)
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "gateway", password], check=True)
    assert broker.proc is not None
    broker.proc.send_signal(1)  # SIGHUP: mosquitto re-reads its config and password file
    gw.wait_ready(30)
    assert gw.starts == 1, "the gateway must recover by reconnecting, not by being restarted"
    records = wait_for_records(kinesis, kinesis_stream, 150, timeout=30)
    report = check_delivery(pub.acked | pub2.acked, records, sent=150)
    report.assert_no_loss()
    print(f"[tls] bad password then fixed: {report}; refused lines: {len(refused)}")
    assert len(refused) <= 2, refused  # one line per distinct failure, not one per retry
