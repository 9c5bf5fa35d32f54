"""The memory floor: a process that has only created a paho client and a boto3 Kinesis client.

Any MQTT → Kinesis bridge in Python pays this (importing botocore and building a Kinesis client
is ~28 MB, DESIGN.md), so the gateway's memory target is stated relative to it. Prints
`{"ready": true}` and then waits for SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys

import boto3
import paho.mqtt.client as mqtt


def main() -> int:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="memory-floor")
    kinesis = boto3.client("kinesis")
    print(json.dumps({"ready": True}), flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    del client, kinesis
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(main())
