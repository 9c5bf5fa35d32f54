"""The simplest bridge a user would write: paho `on_message` → one boto3 `put_record` per message.

Deliberately naive (this is the comparison point, not a recommendation): paho defaults (MQTT 3.1.1,
clean session, auto-ack on receipt, so QoS 1 is acknowledged before Kinesis has the record), the
stdlib json module for the partition key, and a blocking network call inside the callback, which
docs/delivery.md#callbacks-never-block-or-raise explains is a data-loss bug under load. The endpoint comes from boto3's own
AWS_ENDPOINT_URL_KINESIS. Prints one JSON line `{"ready": true}` once subscribed.
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
    ap.add_argument("--topic", required=True)
    ap.add_argument("--qos", type=int, default=0)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--client-id", default="naive-bridge")
    args = ap.parse_args(argv)

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
