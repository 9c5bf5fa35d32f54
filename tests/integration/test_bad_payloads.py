"""Messages no record can be made from: dead-lettered, counted, logged without their payload, acked.

The gateway writes through a pass-through fault proxy so the test can also see every PutRecords
request that reached the endpoint: an oversize record must never be sent (moto, like Kinesis,
fails the whole request for one bad entry). The broker's log shows which PUBACKs the gateway sent.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.gatewayproc import GatewayProcess, write_routes
from tests.support.oracle import emit, wait_delivered, wait_until
from tests.support.publisher import Publisher, welder_payload
from tests.support.services import Mosquitto, wait_for_records

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MIB = 1024 * 1024
SECRET = "SECRET-PAYLOAD-MARKER"


def routes_with_dead_letter(tmp_path: Path, main: str, dlq: str) -> Path:
    return write_routes(tmp_path / "routes.yaml", f"""\
version: 1
defaults:
  qos: 1
  dead_letter:
    stream: {dlq}
routes:
  - name: telemetry
    topic: "plant/#"
    stream: {main}
    partition_key: name
  - name: events
    topic: "events/#"
    stream: {main}
    partition_key: device
""")


def envelopes(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [json.loads(r["data"]) for r in records]


def big_payload(seq: int, size: int) -> bytes:
    """Valid JSON of exactly `size` bytes carrying `seq`."""
    head = json.dumps({"name": "big", "seq": seq, "pad": ""}).encode()
    pad = size - len(head)
    return head[:-2] + b"x" * pad + head[-2:]


def test_payload_of_1mib_plus_1_is_dead_lettered_and_the_valid_ones_arrive(
        tmp_path: Path, make_stream: Callable[..., str], kinesis: Any, mosquitto: Mosquitto,
        fault_proxy: FaultProxy, gateway_process: Callable[..., GatewayProcess],
        publisher: Callable[..., Publisher]) -> None:
    n, big_seq, size = 400, 200, MIB + 1
    main, dlq = make_stream(suffix="-main"), make_stream(suffix="-dlq")
    gw = gateway_process(routes_with_dead_letter(tmp_path, main, dlq), kinesis_url=fault_proxy.url,
                         client_id="gw-big")
    started = time.monotonic()
    pub = publisher(topic_for=lambda seq: f"plant/line1/m{seq % 3}",
                    payload=lambda seq: big_payload(seq, size) if seq == big_seq
                    else welder_payload(seq))
    pub.publish_range(n)
    assert pub.wait_acked(30)
    assert big_seq in pub.acked, f"the broker refused the {size}-byte message: {pub.refused}"
    valid = pub.acked - {big_seq}
    report, _ = wait_delivered(kinesis, main, valid, n, timeout=60)
    dead = wait_for_records(kinesis, dlq, 1, timeout=30)
    assert wait_until(lambda: mosquitto.pubacks_from("gw-big") >= n, 30), \
        "the gateway did not acknowledge every message, the oversize one included"
    elapsed = time.monotonic() - started
    largest = fault_proxy.max_kinesis_bytes()
    bad_requests = {k: v for k, v in fault_proxy.counts.items()
                    if k.startswith("PutRecords:") and k != "PutRecords:pass"}
    dead_lettered = gw.metric("records_dead_lettered_total", route="telemetry")
    emit("oversize-1MiB+1", f"{report} | dead-lettered={len(dead)} (metric {dead_lettered:.0f}) "
         f"largest PutRecords={largest} bytes, failed requests={bad_requests or 0} "
         f"gateway PUBACKs={mosquitto.pubacks_from('gw-big')} duration={elapsed:.1f}s")
    report.assert_no_loss()
    assert not report.extra, "the oversize message reached the main stream"
    assert report.received_unique == n - 1 and report.duplicates == 0
    [envelope] = envelopes(dead)
    assert envelope["route"] == "telemetry" and envelope["topic"] == f"plant/line1/m{big_seq % 3}"
    assert "too large" in envelope["reason"]
    assert envelope["payload_bytes"] == size and envelope.get("payload_truncated") is True
    assert base64.b64decode(envelope["payload_base64"]) == big_payload(big_seq, size)[:512 * 1024]
    assert dead[0]["partition_key"] == envelope["topic"]
    assert dead_lettered == 1
    assert not bad_requests, "an oversize record reached the endpoint and failed a batch"
    assert gw.alive


def test_bad_payloads_are_dead_lettered_counted_logged_without_payload_and_acked(
        tmp_path: Path, make_stream: Callable[..., str], kinesis: Any, mosquitto: Mosquitto,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher]) -> None:
    main, dlq = make_stream(suffix="-main"), make_stream(suffix="-dlq")
    gw = gateway_process(routes_with_dead_letter(tmp_path, main, dlq), client_id="gw-bad")
    bad = {  # seq -> (topic, payload, route, reason fragment)
        1000: ("plant/line1/not-json", f"{SECRET} this is not JSON".encode(), "telemetry",
               "payload is not JSON"),
        1001: ("plant/line1/no-key", json.dumps({"seq": 1001, "secret": SECRET}).encode(),
               "telemetry", "partition key is null"),
        1002: ("events/door/1", b"\xff\xfe" + SECRET.encode() + b"\xc3\x28", "events",
               "payload is not valid UTF-8"),
    }
    door = 2000  # a valid message on the second route, after that route's bad one

    def topic(seq: int) -> str:
        return bad[seq][0] if seq in bad else "events/door/2" if seq == door else \
            f"plant/line2/m{seq % 3}"

    def payload(seq: int) -> bytes:
        if seq in bad:
            return bad[seq][1]
        return json.dumps({"device": "door-2", "seq": seq}).encode() if seq == door \
            else welder_payload(seq)

    started = time.monotonic()
    pub = publisher(topic_for=topic, payload=payload)
    before, after = list(range(0, 50)), list(range(50, 100))
    pub.publish_range(before + list(bad) + after + [door])
    assert pub.wait_acked(30)
    valid = set(before) | set(after) | {door}
    report, _ = wait_delivered(kinesis, main, valid, len(valid) + len(bad), timeout=60)
    dead = wait_for_records(kinesis, dlq, len(bad), timeout=30)
    total = len(valid) + len(bad)
    assert wait_until(lambda: mosquitto.pubacks_from("gw-bad") >= total, 30), \
        "the gateway did not acknowledge every message, the bad ones included"
    elapsed = time.monotonic() - started
    logs = [e for e in gw.logs() if "rejected" in str(e.get("message", e.get("raw", "")))]
    per_route = {r: gw.metric("records_dead_lettered_total", route=r) for r in ("telemetry", "events")}
    emit("bad-payloads", f"{report} | bad={len(bad)} dead-lettered={len(dead)} metric={per_route} "
         f"rejection log lines={len(logs)} gateway PUBACKs={mosquitto.pubacks_from('gw-bad')} "
         f"duration={elapsed:.1f}s")
    report.assert_no_loss()
    assert report.duplicates == 0
    assert per_route == {"telemetry": 2, "events": 1}
    by_topic = {e["topic"]: e for e in envelopes(dead)}
    assert sorted(by_topic) == sorted(t for t, _, _, _ in bad.values())
    for topic, payload, route, reason in bad.values():
        envelope = by_topic[topic]
        assert envelope["route"] == route and reason in envelope["reason"]
        assert base64.b64decode(envelope["payload_base64"]) == payload
        assert any(e.get("route") == route and e.get("topic") == topic
                   and route in e["message"] and topic in e["message"] for e in logs), \
            f"no log line names route {route!r} and topic {topic!r}: {logs}"
    text = gw.stderr_text() + gw.stdout_text()
    assert SECRET not in text, "a payload leaked into the log"
    assert "Traceback" not in text
    assert all("\n" not in e["message"] for e in logs)
    assert gw.alive
