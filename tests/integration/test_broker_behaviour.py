"""How the gateway copes with what brokers differ in, with real processes: mosquitto, moto, the gateway.

Overlapping filters on MQTT 5 (one copy per subscription from the broker, one record per route
from the gateway) and the TLS ALPN protocol AWS IoT Core wants on port 443 (against a local TLS
listener that requires it). Retained messages per broker: test_retained_live.py.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import Pki
from tests.support.gatewayproc import GatewayProcess, write_routes
from tests.support.oracle import emit, seqs_in, wait_until
from tests.support.publisher import Publisher
from tests.support.services import Mosquitto, read_all

pytestmark = pytest.mark.integration


def _topic(seq: int) -> str:
    """Half match both filters, a quarter only factory/#, a quarter only +/+/welder/+/telemetry."""
    kind = seq % 4
    if kind < 2:
        return f"factory/line{seq % 3}/welder/d{seq % 7}/telemetry"
    if kind == 2:
        return f"factory/line{seq % 3}/press/d{seq % 7}/telemetry"
    return f"plant{seq % 5}/line{seq % 3}/welder/d{seq % 7}/telemetry"


@pytest.mark.timeout(240)
def test_overlapping_filters_on_mqtt5_give_one_record_per_route_per_message(
        tmp_path: Path, make_stream: Callable[..., str], kinesis: Any, mosquitto: Mosquitto,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    n = 5_000
    stream = make_stream()
    routes = write_routes(tmp_path / "routes.yaml", f"""\
version: 1
defaults:
  qos: 1
  stream: {stream}
routes:
  - name: everything
    topic: "factory/#"
    partition_key: "'everything'"
  - name: welders
    topic: "+/+/welder/+/telemetry"
    partition_key: "'welders'"
""")
    expected: Counter[tuple[str, int]] = Counter()
    for seq in range(n):
        topic = _topic(seq)
        if topic.startswith("factory/"):
            expected[("everything", seq)] += 1
        if "/welder/" in topic:
            expected[("welders", seq)] += 1
    gw = gateway_process(routes, extra_env={"MQTT_PROTOCOL": "5"})
    pub = publisher(topic_for=_topic)
    started = time.monotonic()
    pub.publish_range(n)
    assert pub.wait_acked(60), f"broker did not PUBACK {len(pub.unacked)} messages"
    assert wait_until(lambda: gw.metric("records_put_total") >= sum(expected.values()), 120), (
        f"gateway put {gw.metric('records_put_total'):.0f} of {sum(expected.values())}\n{gw.output_tail()}")
    time.sleep(1.0)   # copies the broker still had on the way would be written by now
    elapsed = time.monotonic() - started
    got: Counter[tuple[str, int]] = Counter()
    for record in read_all(kinesis, stream):
        for seq in seqs_in(record["data"]):
            got[(record["partition_key"], seq)] += 1
    missing, duplicates = expected - got, got - expected
    emit("overlapping-filters-mqtt5", f"messages={n} records expected={sum(expected.values())} "
         f"received={sum(got.values())} missing={sum(missing.values())} duplicates={sum(duplicates.values())} "
         f"duration={elapsed:.1f}s")
    assert not missing, f"missing (route, seq), first: {list(missing)[:10]}"
    assert not duplicates, f"duplicated (route, seq), first: {list(duplicates)[:10]}"
    assert "routed once, by its subscription identifiers" in gw.output_tail(100_000), \
        "mosquitto sent no second copies: the test did not exercise the overlap"
    assert gw.alive


# --- AWS IoT Core's port 443: TLS with the ALPN protocol x-amzn-mqtt-ca -----------------------------

ALPN = "x-amzn-mqtt-ca"


class AlpnListener:
    """A TLS listener on 127.0.0.1 that, like AWS IoT Core on 443, takes MQTT with a client
    certificate only when the client offered `x-amzn-mqtt-ca`; it forwards to a plain broker port.
    `refused` counts handshakes it closed for want of the protocol."""

    def __init__(self, pki: Pki, broker_port: int) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server.cert, pki.server.key)
        self.context.load_verify_locations(pki.ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.set_alpn_protocols([ALPN])
        self.broker_port, self.accepted, self.refused = broker_port, 0, 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            self.refused += 1
            raw.close()
            return
        if tls.selected_alpn_protocol() != ALPN:
            self.refused += 1
            tls.close()
            return
        self.accepted += 1
        upstream = socket.create_connection(("127.0.0.1", self.broker_port))
        self.sockets += [tls, upstream]
        threading.Thread(target=self._pump, args=(upstream, tls), daemon=True).start()
        self._pump(tls, upstream)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass


@pytest.mark.timeout(120)
def test_alpn_x_amzn_mqtt_ca_connects_where_it_is_required_and_is_refused_without(
        tmp_path: Path, make_stream: Callable[..., str], kinesis: Any, mosquitto: Mosquitto, test_pki: Pki,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    stream = make_stream()
    routes = write_routes(tmp_path / "routes.yaml", f"""\
version: 1
routes:
  - name: things
    topic: "things/#"
    stream: {stream}
    partition_key: "topic()"
""")
    listener = AlpnListener(test_pki, mosquitto.port)
    try:
        tls_env = {"MQTT_TLS_CA_FILE": str(test_pki.ca),
                   "MQTT_TLS_CERT_FILE": str(test_pki.client.cert), "MQTT_TLS_KEY_FILE": str(test_pki.client.key),
                   "MQTT_RECONNECT_MIN_S": "0.2", "MQTT_RECONNECT_MAX_S": "1"}
        without = gateway_process(routes, mqtt_port=listener.port, ready=False, client_id="gw-no-alpn",
                                  extra_env=tls_env)
        assert wait_until(lambda: listener.refused >= 2, 30), without.output_tail()
        assert listener.accepted == 0
        code, _ = without.http_get("/readyz")
        assert code == 503
        without.terminate()

        gw = gateway_process(routes, mqtt_port=listener.port, client_id="gw-alpn",
                             extra_env={**tls_env, "MQTT_TLS_ALPN": ALPN})
        assert listener.accepted >= 1
        pub = publisher(topic="things/1")
        pub.publish_range(50)
        assert pub.wait_acked(30)
        assert wait_until(lambda: gw.metric("records_put_total") >= 50, 60), gw.output_tail()
        emit("alpn-x-amzn-mqtt-ca", f"without ALPN: refused={listener.refused} accepted=0; with ALPN: "
             f"accepted={listener.accepted}, 50 of 50 messages in Kinesis")
    finally:
        listener.close()
