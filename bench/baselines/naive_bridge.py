"""The simplest bridge a user would write: paho `on_message` → one boto3 `put_record` per message.

Deliberately naive (this is the comparison point, not a recommendation): paho defaults (MQTT 3.1.1,
clean session, auto-ack on receipt, so QoS 1 is acknowledged before Kinesis has the record), the
stdlib json module for the partition key, and a blocking network call inside the callback, which
docs/delivery.md#callbacks-never-block-or-raise explains is a data-loss bug under load. The endpoint comes from boto3's own
AWS_ENDPOINT_URL_KINESIS. Prints one JSON line `{"ready": true}` once subscribed. With `--env-file`
it reads the Go bridge's `.env` names instead (BROKER, PORT, TOPIC, QOS, KIN_STREAM_NAME, CLIENTID),
which makes it a stand-in for any external bridge (`python -m bench.run --subject`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

import boto3
import paho.mqtt.client as mqtt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="naive_bridge")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--topic")
    ap.add_argument("--qos", type=int, default=0)
    ap.add_argument("--stream")
    ap.add_argument("--client-id", default="naive-bridge")
    ap.add_argument("--env-file", help="a Go bridge .env: NAME=value lines")
    args = ap.parse_args(argv)
    if args.env_file:
        with open(args.env_file) as f:
            env = dict(line.strip().split("=", 1) for line in f if "=" in line)
        args.host, args.port, args.topic = env["BROKER"], int(env["PORT"]), env["TOPIC"]
        args.qos, args.stream, args.client_id = int(env["QOS"]), env["KIN_STREAM_NAME"], env["CLIENTID"]
    if not (args.topic and args.stream):
        ap.error("--topic and --stream (or --env-file) are required")

    kinesis = boto3.client("kinesis")

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(args.topic, qos=args.qos)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        print(json.dumps({"ready": True}), flush=True)

    def on_message(client, userdata, msg):
        kinesis.put_record(StreamName=args.stream, Data=msg.payload,
                           PartitionKey=json.loads(msg.payload)["name"])

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    client.connect(args.host, args.port)
    client.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
