"""paho's bare receive rate: an `on_message` that only counts, the in-process ceiling.

Whatever the gateway does per message comes on top of this: paho's own packet parsing and
callback dispatch. `--fast-path` runs paho with the two changes the gateway makes to paho's
per-message work (gateway/source/fastpath.py), to show how much of the gateway's rate is theirs. For QoS 1 paho acknowledges
on receipt. Protocol and Receive Maximum are arguments so the QoS 1 ceiling uses the same flow
window as the gateway (MQTT 5, Receive Maximum 1000 by default). Exits after `--expect` messages,
after `--idle-s` without one, or on SIGTERM, printing `{"n", "first_ns", "last_ns"}`.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def peak_rss_kb() -> int:
    """VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bare_receive")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--qos", type=int, default=0)
    ap.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    ap.add_argument("--receive-maximum", type=int, default=1000)
    ap.add_argument("--expect", type=int, default=0, help="exit after this many messages (0 = never)")
    ap.add_argument("--idle-s", type=float, default=0.0, help="exit after this long without a message")
    ap.add_argument("--client-id", default="bare-receive")
    ap.add_argument("--fast-path", action="store_true",
                    help="paho with the gateway's two changes (gateway/source/fastpath.py)")
    args = ap.parse_args(argv)

    state = {"n": 0, "first_ns": 0, "last_ns": 0}
    v5 = args.protocol == "5"

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe(args.topic, qos=args.qos)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        print(json.dumps({"ready": True, "cpu": time.process_time()}), flush=True)

    def on_message(client, userdata, msg):
        now = time.time_ns()
        state["n"] += 1
        state["last_ns"] = now
        if not state["first_ns"]:
            state["first_ns"] = now
        if state["n"] == args.expect:
            client.disconnect()

    client_class = mqtt.Client
    if args.fast_path:
        from gateway.source import fastpath

        fastpath.install()
        client_class = fastpath.BufferedClient
    client = client_class(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id,
                          protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    props = None
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = args.receive_maximum
    signal.signal(signal.SIGTERM, lambda *_: client.disconnect())
    if args.idle_s > 0:
        def watchdog() -> None:
            seen = -1
            while True:
                time.sleep(args.idle_s)
                if state["n"] and state["n"] == seen:
                    client.disconnect()
                    return
                seen = state["n"]
        threading.Thread(target=watchdog, daemon=True).start()
    client.connect(args.host, args.port, properties=props)
    if args.fast_path:   # paho's loop_forever does not know about bytes already read into the buffer
        while client.loop(timeout=1.0) == mqtt.MQTT_ERR_SUCCESS:
            while client.buffered() and client.loop_read() == mqtt.MQTT_ERR_SUCCESS:
                pass
    else:
        client.loop_forever()
    state["cpu"] = time.process_time()
    state["maxrss_kb"] = peak_rss_kb()
    print(json.dumps(state), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
