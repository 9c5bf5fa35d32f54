"""The README's first Quick start command: the gateway end to end on local stand-ins.

Starts a Mosquitto broker and moto's Kinesis server on 127.0.0.1, creates the streams that
`routes.example.yaml` names, runs `mqtt-kinesis-gateway run --routes routes.example.yaml` as a real
process, publishes sample payloads (the Go bridge's welder among them, plus one that is not JSON),
reads every stream back and prints what landed, then stops everything it started by its pid.
No AWS account and no broker set up by hand.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402

from tests.support.gatewayproc import GatewayProcess  # noqa: E402
from tests.support.services import Mosquitto, MotoServer, create_stream, kinesis_client, read_all  # noqa: E402

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


def _show(stream: str, records: list[dict]) -> None:
    print(f"\n== {stream}: {len(records)} record(s)")
    for record in records:
        data: bytes = record["data"]
        try:
            text = data.decode("utf-8").rstrip("\n")
        except UnicodeDecodeError:
            text = "base64:" + base64.b64encode(data).decode()
        print(f"   key={record['partition_key']!r}  data={text[:160]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", default=str(REPO / "routes.example.yaml"))
    args = parser.parse_args()
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
                print(f"gateway  ready (health and metrics on http://127.0.0.1:{gateway.http_port}/metrics)")
                publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-publisher")
                publisher.connect("127.0.0.1", broker.port)
                publisher.loop_start()
                for topic, payload in MESSAGES:
                    publisher.publish(topic, payload, qos=1).wait_for_publish(5)
                    print(f"published {topic}")
                publisher.loop_stop()
                publisher.disconnect()
                time.sleep(2.0)  # linger + one PutRecords round trip, with margin
                for name in STREAMS:
                    _show(name, read_all(client, name))
                received = gateway.metric("records_put_total")
                dead = gateway.metric("records_dead_lettered_total")
                print(f"\nmetrics: records_put_total={received:.0f} records_dead_lettered_total={dead:.0f}")
            finally:
                code = gateway.terminate()
                print(f"gateway stopped with exit code {code}")
                print("gateway log (last lines):")
                print("\n".join(gateway.output_tail().splitlines()[-12:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
