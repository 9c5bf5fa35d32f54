"""The README's first Quick start command: the gateway end to end on local stand-ins.

Starts a Mosquitto broker and moto's Kinesis server on 127.0.0.1, creates the streams that
`routes.example.yaml` names, runs `mqtt-kinesis-gateway run --routes routes.example.yaml` as a real
process, publishes sample payloads (the Go bridge's welder among them, one that a route's filter
leaves out, and one that is not JSON), says for each what the route file does with it (the
`explain` command's answer), reads every stream back and prints what landed, whole records only,
then stops everything it started by its pid. No AWS account and no broker set up by hand.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt
import yaml

from gateway.cli import main as gateway_cli
from tests.support.gatewayproc import GatewayProcess
from tests.support.services import Mosquitto, MotoServer, create_stream, kinesis_client, wait_for_records

# The example routes write to these streams. press-telemetry is named by its ARN, in eu-west-1 of
# moto's default account (123456789012), so the demo runs in that region (the gateway's client
# writes to the streams of AWS_REGION).
STREAMS = ["welder-telemetry", "press-telemetry", "temperature-alerts", "camera-frames", "gateway-dead-letters"]
REGION = "eu-west-1"
WELDER = {"name": "device123", "model": "welder", "status": "running", "sensor_1": 24.5, "sensor_2": 98.3,
          "sensor_3": 16.1, "sensor_4": 0.9, "sensor_5": 5.5, "sensor_6": 100.32}
MESSAGES: list[tuple[str, bytes]] = [
    ("factory/line1/welder/w7", json.dumps(WELDER).encode()),
    ("factory/line2/welder/w9", json.dumps({**WELDER, "name": "device456"}).encode()),
    ("factory/line1/press/p1", json.dumps({"name": "press-1", "force_kn": 812}).encode()),
    ("sensors/oven-3/temperature", json.dumps({"status": "running", "temperature": 93.5}).encode()),
    ("sensors/oven-4/temperature", json.dumps({"status": "running", "temperature": 41.0}).encode()),
    ("cameras/gate-1/frame", b"\x89PNG\r\n\x1a\n...binary frame..."),
    ("factory/line1/welder/w8", b"this is not JSON"),
]
SHOWN_CHARS_PER_STREAM = 2000  # whole records up to this much text per stream; the rest is counted


def _stream_name(stream: str) -> str:
    """A stream ARN's name part (the demo's streams all live in one account and region)."""
    return stream.rsplit("/", 1)[-1] if stream.startswith("arn:") else stream


def _payload_text(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return f"({len(payload)} bytes, not text)"


class RouteFile:
    """The few facts of the route file the demo explains (filters, dead letters), read as YAML."""

    def __init__(self, path: Path) -> None:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        defaults = doc.get("defaults") or {}
        self._routes = {r["name"]: {**defaults, **r} for r in doc.get("routes") or [] if "name" in r}
        self.path = path

    def filter(self, route: str) -> str:
        return str(self._routes.get(route, {}).get("filter", "?"))

    def dead_letter(self, route: str) -> tuple[str, str] | None:
        target = self._routes.get(route, {}).get("dead_letter") or {}
        for kind in ("stream", "topic"):
            if kind in target:
                return kind, str(target[kind])
        return None

    def explain(self, topic: str, payload: bytes) -> list[dict[str, Any]]:
        """What `mqtt-kinesis-gateway explain` says about one message: one dict per matching route."""
        out, err = io.StringIO(), io.StringIO()
        argv = ["explain", str(self.path), "--topic", topic, "--payload", payload.decode("utf-8", "surrogateescape")]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = gateway_cli(argv)
        if code == 2:
            raise SystemExit(f"explain failed: {err.getvalue().strip()}")
        return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def _describe(routes: RouteFile, outcome: dict[str, Any]) -> str:
    route = outcome["route"]
    if "stream" in outcome:
        stream, key = _stream_name(outcome["stream"]), outcome["partition_key"]
        return f"route {route}: a record for stream {stream}, partition key {key!r}"
    if "skipped" in outcome:
        return (f"route {route}: filtered out: its filter {routes.filter(route)!r} is false for this payload, "
                f"so this route writes nothing (the message is still acknowledged)")
    target = routes.dead_letter(route)
    where = f"goes to its dead letter ({target[0]} {target[1]})" if target else "is dropped (no dead letter)"
    return f"route {route}: rejected ({outcome['rejected']}), so the message {where}"


def _expected_counts(routes: RouteFile, plans: list[list[dict[str, Any]]]) -> dict[str, int]:
    """Records each stream should receive, from the explain answers (dead letters included)."""
    counts = dict.fromkeys(STREAMS, 0)
    for outcomes in plans:
        for outcome in outcomes:
            if "stream" in outcome:
                name = _stream_name(outcome["stream"])
            elif "rejected" in outcome and (target := routes.dead_letter(outcome["route"])) and target[0] == "stream":
                name = target[1]
            else:
                continue
            counts[name] = counts.get(name, 0) + 1
    return counts


def _record_lines(data: bytes) -> list[str]:
    """One record as whole lines: its text (or base64), and a dead letter's payload decoded."""
    try:
        text = data.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError:
        return ["base64:" + base64.b64encode(data).decode()]
    lines = [text]
    try:
        envelope = json.loads(text)
    except ValueError:
        return lines
    if isinstance(envelope, dict) and "payload_base64" in envelope:
        payload = base64.b64decode(envelope["payload_base64"])
        lines.append(f"(dead letter: payload_base64 decodes to {_payload_text(payload)!r})")
    return lines


def _show(stream: str, records: list[dict[str, Any]]) -> None:
    print(f"\n== {stream}: {len(records)} record(s)")
    budget = SHOWN_CHARS_PER_STREAM
    for index, record in enumerate(records):
        lines = _record_lines(record["data"])
        size = sum(len(line) for line in lines)
        if index and size > budget:  # cut only between records, never inside one
            rest = records[index:]
            more = sum(len(r["data"]) for r in rest)
            print(f"   … {len(rest)} more record(s), {more} more bytes, not shown")
            return
        budget -= size
        print(f"   key={record['partition_key']!r}  data={lines[0]}")
        for extra in lines[1:]:
            print(f"   {extra}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", default=str(REPO / "routes.example.yaml"))
    args = parser.parse_args()
    routes = RouteFile(Path(args.routes))
    plans = [routes.explain(topic, payload) for topic, payload in MESSAGES]
    with tempfile.TemporaryDirectory(prefix="mkg-demo-") as tmp:
        work = Path(tmp)
        with Mosquitto(work / "broker") as broker, MotoServer(work / "kinesis") as kinesis:
            broker.start()
            kinesis.start()
            client = kinesis_client(kinesis.url, region_name=REGION)
            for name in STREAMS:
                create_stream(client, name)
            print(f"broker   mqtt://127.0.0.1:{broker.port}")
            print(f"kinesis  {kinesis.url} (moto server, {REGION}), streams: {', '.join(STREAMS)}")
            gateway = GatewayProcess(work / "gateway", mqtt_port=broker.port, kinesis_url=kinesis.url,
                                     routes=args.routes, client_id="demo-gateway",
                                     extra_env={"AWS_REGION": REGION, "LOG_FORMAT": "text"})
            try:
                gateway.start()
                gateway.wait_ready(timeout=30)
                print(f"gateway  ready (health and metrics on http://127.0.0.1:{gateway.http_port}/metrics)\n")
                publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-publisher")
                publisher.connect("127.0.0.1", broker.port)
                publisher.loop_start()
                for (topic, payload), outcomes in zip(MESSAGES, plans):
                    publisher.publish(topic, payload, qos=1).wait_for_publish(5)
                    print(f"published {topic}  {_payload_text(payload)}")
                    for outcome in outcomes:
                        print(f"   -> {_describe(routes, outcome)}")
                    if not outcomes:
                        print("   -> no route matches this topic: acknowledged, nothing written")
                publisher.loop_stop()
                publisher.disconnect()
                expected = _expected_counts(routes, plans)
                for name in STREAMS:
                    records = wait_for_records(client, name, expected.get(name, 0), timeout=15, poll_s=0.3)
                    _show(name, records)
                put = gateway.metric("records_put_total")
                dead = gateway.metric("records_dead_lettered_total")
                print(f"\nmetrics: records_put_total={put:.0f} records_dead_lettered_total={dead:.0f}")
            finally:
                code = gateway.terminate()
                print(f"gateway stopped with exit code {code}")
                print("gateway log (last lines):")
                print("\n".join(gateway.output_tail().splitlines()[-12:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
