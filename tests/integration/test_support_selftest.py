"""The test infrastructure proves itself here, without the gateway: if these fail, fault-test
results mean nothing (a proxy that did not inject its fault would make every test pass)."""

from __future__ import annotations

import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.support.certs import Pki
from tests.support.faultproxy import ERROR_STATUS, FaultProxy
from tests.support.gatewayproc import GatewayProcess
from tests.support.oracle import check_delivery
from tests.support.services import (
    Mosquitto,
    MotoServer,
    TlsFiles,
    kinesis_client,
    read_all,
    stop_process,
    websockets_supported,
)
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration


class Subscriber:
    """Minimal paho subscriber collecting payloads, for checking the broker and proxies."""

    def __init__(self, port: int, topic: str = "#", client_id: str = "selftest-sub",
                 clean: bool = True, **tls: Any) -> None:
        self.messages: list[bytes] = []
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.session_present: bool | None = None
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv311, clean_session=clean)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: self.disconnected.set()
        self.c.on_message = lambda c, u, m: self.messages.append(m.payload)
        self.topic, self.port = topic, port

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, p: Any) -> None:
        if not rc.is_failure:
            self.session_present = flags.session_present
            c.subscribe(self.topic, qos=1)
            self.connected.set()

    def start(self, timeout: float = 5.0) -> Subscriber:
        self.c.connect("127.0.0.1", self.port, keepalive=60)
        self.c.loop_start()
        assert self.connected.wait(timeout), "subscriber did not connect"
        time.sleep(0.1)  # SUBACK
        return self

    def wait_for(self, n: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.messages

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_broker_roundtrip_acks_every_seq(mosquitto: Mosquitto, publisher: Any) -> None:
    sub = Subscriber(mosquitto.port).start()
    pub = publisher()
    pub.publish_range(200)
    assert pub.wait_acked(10)
    assert pub.acked == set(range(200)) and not pub.refused
    report = check_delivery(pub.acked, sub.wait_for(200))
    report.assert_no_loss()
    assert report.duplicates == 0
    sub.stop()
    assert "New client connected" in mosquitto.log_text()


def test_broker_persistent_session_survives_sigterm_restart(mosquitto_factory: Any,
                                                            publisher: Any) -> None:
    broker = mosquitto_factory(persistence=True)
    Subscriber(broker.port, "t/#", client_id="persist", clean=False).start().stop()
    pub = publisher(port=broker.port, topic="t/1")
    pub.publish_range(20)
    assert pub.wait_acked(5)
    pub.close()
    broker.restart()
    sub = Subscriber(broker.port, "t/#", client_id="persist", clean=False).start()
    assert sub.session_present is True
    check_delivery(pub.acked, sub.wait_for(20)).assert_no_loss()
    sub.stop()


def test_broker_logs_when_a_full_queue_drops_messages(mosquitto_factory: Any,
                                                     publisher: Any) -> None:
    broker = mosquitto_factory(max_queued_messages=10)
    Subscriber(broker.port, "t/#", client_id="slowpoke", clean=False).start().stop()
    pub = publisher(port=broker.port, topic="t/1")
    pub.publish_range(30)
    assert pub.wait_acked(5) and len(pub.acked) == 30  # the publisher sees success ...
    deadline = time.monotonic() + 5
    while not broker.dropped_messages_logged() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert broker.dropped_messages_logged()  # ... and only the broker log tells


def test_broker_password_file_refuses_wrong_password(mosquitto_factory: Any) -> None:
    broker = mosquitto_factory(allow_anonymous=False, passwords={"gw": "s3cret"})
    for password, ok in (("s3cret", True), ("wrong", False)):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pw-{ok}")
        c.username_pw_set("gw", password)
        result: list[Any] = []
        c.on_connect = lambda c, u, f, rc, p: result.append(rc)
        c.connect("127.0.0.1", broker.port)
        deadline = time.monotonic() + 5
        while not result and time.monotonic() < deadline:
            c.loop(0.1)
        assert result and (not result[0].is_failure) is ok
        c.disconnect()


def _tls_connect(port: int, ca: Path, cert: Any = None) -> bool:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls-probe")
    c.tls_set(ca_certs=str(ca), certfile=str(cert.cert) if cert else None,
              keyfile=str(cert.key) if cert else None)
    result: list[Any] = []
    c.on_connect = lambda c, u, f, rc, p: result.append(rc)
    try:
        c.connect("127.0.0.1", port)
        deadline = time.monotonic() + 5
        while not result and time.monotonic() < deadline:
            if c.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:  # the broker closed the TLS session
                return False
    except (ssl.SSLError, OSError):
        return False
    finally:
        c.disconnect()
    return bool(result) and not result[0].is_failure


def test_tls_listener_accepts_good_cert_and_refuses_expired_wrong_ca(mosquitto_factory: Any,
                                                                      test_pki: Pki) -> None:
    good = mosquitto_factory(tls=TlsFiles(test_pki.ca, test_pki.server.cert, test_pki.server.key))
    assert _tls_connect(good.tls_port, test_pki.ca)
    assert not _tls_connect(good.tls_port, test_pki.other_ca)
    expired = mosquitto_factory(tls=TlsFiles(test_pki.ca, test_pki.expired_server.cert,
                                             test_pki.expired_server.key))
    assert not _tls_connect(expired.tls_port, test_pki.ca)
    mtls = mosquitto_factory(tls=TlsFiles(test_pki.ca, test_pki.server.cert, test_pki.server.key),
                             require_certificate=True)
    assert _tls_connect(mtls.tls_port, test_pki.ca, test_pki.client)
    assert not _tls_connect(mtls.tls_port, test_pki.ca)
    assert not _tls_connect(mtls.tls_port, test_pki.ca, test_pki.other_client)


def test_websockets_probe_answers_without_hanging() -> None:
    assert websockets_supported() in (True, False)


def test_moto_stream_returns_every_record_from_every_shard(kinesis: Any,
                                                           make_stream: Any) -> None:
    stream = make_stream(shards=3)
    records = [{"Data": b'{"seq": %d}' % i, "PartitionKey": f"k{i}"} for i in range(300)]
    assert kinesis.put_records(StreamName=stream, Records=records)["FailedRecordCount"] == 0
    got = read_all(kinesis, stream)
    assert len({r["shard_id"] for r in got}) == 3
    check_delivery(range(300), got).assert_no_loss()


def test_moto_reset_forgets_streams(tmp_path: Path) -> None:
    with MotoServer(tmp_path) as server:
        client = server.client()
        client.create_stream(StreamName="gone", ShardCount=1)
        server.reset()
        assert client.list_streams()["StreamNames"] == []


def _put(client: Any, stream: str, seqs: range) -> dict[str, Any]:
    return dict(client.put_records(StreamName=stream, Records=[
        {"Data": b'{"seq": %d}' % i, "PartitionKey": f"k{i}"} for i in seqs]))


def test_botocore_speaks_json_not_cbor_to_kinesis(fault_proxy: FaultProxy, kinesis: Any,
                                                  kinesis_stream: str) -> None:
    _put(kinesis_client(fault_proxy.url), kinesis_stream, range(3))
    assert set(fault_proxy.content_types) == {"application/x-amz-json-1.1"}
    assert fault_proxy.requests[-1].entries == 3


@pytest.mark.parametrize("code", sorted(ERROR_STATUS))
def test_fault_proxy_whole_request_error_writes_nothing(code: str, fault_proxy: FaultProxy,
                                                        kinesis: Any, kinesis_stream: str) -> None:
    fault_proxy.error(code)
    with pytest.raises(ClientError) as info:
        _put(kinesis_client(fault_proxy.url, attempts=1), kinesis_stream, range(5))
    assert info.value.response["Error"]["Code"] == code.removesuffix("Exception") or \
        info.value.response["Error"]["Code"] == code
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == ERROR_STATUS[code]
    assert read_all(kinesis, kinesis_stream) == []
    assert fault_proxy.counts[f"PutRecords:error:{code}"] == 1
    fault_proxy.pass_through()
    assert _put(kinesis_client(fault_proxy.url), kinesis_stream, range(5))["FailedRecordCount"] == 0


def test_fault_proxy_error_lasts_for_its_duration(fault_proxy: FaultProxy, kinesis_stream: str
                                                  ) -> None:
    client = kinesis_client(fault_proxy.url, attempts=1)
    fault_proxy.error("InternalFailure", for_s=0.3)
    with pytest.raises(ClientError):
        _put(client, kinesis_stream, range(1))
    time.sleep(0.4)
    assert _put(client, kinesis_stream, range(1))["FailedRecordCount"] == 0


def test_fault_proxy_partial_failure_writes_only_the_successful_entries(
        fault_proxy: FaultProxy, kinesis: Any, kinesis_stream: str) -> None:
    fault_proxy.partial(0.3, seed=7)
    resp = _put(kinesis_client(fault_proxy.url), kinesis_stream, range(500))
    failed = [i for i, r in enumerate(resp["Records"]) if "ErrorCode" in r]
    assert resp["FailedRecordCount"] == len(failed) and 100 < len(failed) < 200
    assert {resp["Records"][i]["ErrorCode"] for i in failed} == {
        "ProvisionedThroughputExceededException"}
    report = check_delivery(set(range(500)) - set(failed), read_all(kinesis, kinesis_stream))
    report.assert_no_loss()
    assert report.extra == [] and report.duplicates == 0
    assert fault_proxy.max_entries() == 500 and fault_proxy.counts["entries:failed"] == len(failed)


@pytest.mark.parametrize("kind,error", [("refuse", EndpointConnectionError),
                                        ("reset", ConnectionClosedError), ("503", ClientError)])
def test_fault_proxy_down_then_back(kind: str, error: type[Exception], fault_proxy: FaultProxy,
                                    kinesis_stream: str) -> None:
    client = kinesis_client(fault_proxy.url, attempts=1)
    _put(client, kinesis_stream, range(1))  # a kept-alive connection exists before the outage
    fault_proxy.down(kind)
    with pytest.raises((error, ConnectionClosedError)):  # the open connection is reset first
        _put(client, kinesis_stream, range(1))
    with pytest.raises(error):  # then a new one meets the outage itself
        _put(client, kinesis_stream, range(1))
    fault_proxy.pass_through()
    assert _put(client, kinesis_stream, range(1))["FailedRecordCount"] == 0


def test_fault_proxy_delay_slows_and_stall_writes_before_answering(
        fault_proxy: FaultProxy, kinesis: Any, kinesis_stream: str) -> None:
    client = kinesis_client(fault_proxy.url, attempts=1)
    fault_proxy.delay(0.5)
    t = time.monotonic()
    _put(client, kinesis_stream, range(1))
    assert time.monotonic() - t >= 0.5
    fault_proxy.stall(3)
    worker = threading.Thread(target=_put, args=(client, kinesis_stream, range(1, 3)))
    worker.start()
    time.sleep(1)
    assert worker.is_alive()  # the caller has no answer yet ...
    assert len(read_all(kinesis, kinesis_stream)) == 3  # ... but Kinesis already holds the records
    worker.join(5)
    assert fault_proxy.max_kinesis_bytes() > 0


def test_tcp_proxy_cut_resets_and_refuses_then_heals(mosquitto: Mosquitto,
                                                     tcp_proxy: TcpProxy) -> None:
    sub = Subscriber(tcp_proxy.port, "t").start()
    tcp_proxy.cut()
    assert sub.disconnected.wait(5)
    with pytest.raises(ConnectionRefusedError):
        __import__("socket").create_connection(("127.0.0.1", tcp_proxy.port), timeout=1)
    sub.connected.clear()
    tcp_proxy.heal()
    assert sub.connected.wait(10)  # paho's automatic reconnect
    sub.stop()


def test_tcp_proxy_blackhole_stalls_without_reset_and_heal_resumes(
        mosquitto: Mosquitto, tcp_proxy: TcpProxy, publisher: Any) -> None:
    sub = Subscriber(tcp_proxy.port, "t").start()
    pub = publisher(topic="t")
    tcp_proxy.blackhole()
    pub.publish_range(5)
    time.sleep(1)
    assert sub.messages == [] and not sub.disconnected.is_set()
    tcp_proxy.heal()
    assert len(sub.wait_for(5)) == 5
    sub.stop()


FAKE_GATEWAY = r"""
import json, os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = (b"# TYPE mqtt_kinesis_gateway_records_put_total counter\n"
                b'mqtt_kinesis_gateway_records_put_total{route="r",stream="s"} 7.0\n'
                if self.path == "/metrics" else b"ok")
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
print(json.dumps({"msg": "started", "args": sys.argv[1:], "client": os.environ["MQTT_CLIENT_ID"],
                  "user": os.environ.get("USER")}), file=sys.stderr, flush=True)
print("not json", flush=True)
HTTPServer((os.environ["HTTP_HOST"], int(os.environ["HTTP_PORT"])), H).serve_forever()
"""


def test_gateway_process_helper_runs_waits_reads_and_stops(tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path, mqtt_port=1, kinesis_url="http://127.0.0.1:1",
                        routes="routes.yaml", command=[sys.executable, "-c", FAKE_GATEWAY],
                        extra_env={"MQTT_TLS": "false"})
    gw.start().wait_ready(10)
    logs = gw.logs()
    assert logs[0] == {"msg": "started", "args": ["run", "--routes", "routes.yaml"],
                       "client": "gw-test", "user": None}
    assert {"raw": "not json"} in logs
    assert gw.metric("records_put_total", route="r") == 7.0
    assert gw.terminate() == 0
    gw.restart(ready_timeout=10)
    assert gw.kill() == -9 and gw.starts == 2


def test_gateway_process_fixture_defaults_to_the_session_services(
        gateway_process: Any, mosquitto: Mosquitto, kinesis_endpoint: MotoServer) -> None:
    gw = gateway_process(command=[sys.executable, "-c", FAKE_GATEWAY], client_id="gw-a")
    assert gw.env["MQTT_PORT"] == str(mosquitto.port)
    assert gw.env["AWS_ENDPOINT_URL_KINESIS"] == kinesis_endpoint.url
    assert gw.logs()[0]["client"] == "gw-a"


def test_stop_process_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    import subprocess
    proc = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
                             "time.sleep(60)"], stdout=subprocess.PIPE)
    proc.stdout.readline()  # type: ignore[union-attr]
    t = time.monotonic()
    assert stop_process(proc, timeout=0.5) == -9
    assert time.monotonic() - t < 5


def test_oracle_reports_lost_and_duplicate_seqs() -> None:
    records = [b'{"seq": 1}', b'{"seq": 1}', b'{"seq": 3}\n', b"garbage"]
    report = check_delivery({1, 2, 3, 4}, records, sent=5)
    assert report.lost == [2, 4] and report.duplicates == 1 and report.foreign == 1
    with pytest.raises(AssertionError, match=r"first seqs \[2, 4\]"):
        report.assert_no_loss()
