"""A few hundred generated bad messages through the real gateway process, Mosquitto and moto.

The bulk of the fuzzing runs in-process (tests/unit/test_fuzz_payloads.py); this is the check that
the same inputs over real sockets change nothing: the process stays up, its logs hold no
traceback and no callback error, and what lands in each stream and each dead letter (a Kinesis
stream and an MQTT topic) is exactly what the route table says for each message, counted in
/metrics. Cases come from a seeded generator (FUZZ_SEED overrides the seed; it is printed).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.model import Message, Record, Rejected
from gateway.routefile.loader import load_routes_text
from tests.support.gatewayproc import GatewayProcess
from tests.support.publisher import Publisher
from tests.support.services import HOST, Mosquitto, read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MIB = 1024 * 1024
N_CASES = 400
SEED = int(os.environ.get("FUZZ_SEED", "20240611"))
# characters Mosquitto accepts in a topic (it refuses control characters) plus awkward ones
TOPIC_CHARS = list("abcXYZ019 -_.") + ["é", "€", "語", "𝄞", "😀", "\u202e", "\ufeff", "ß"]

ROUTES = """\
version: 1
defaults:
  qos: 1
  dead_letter:
    stream: {dead}
routes:
  - name: by-id
    topic: "fz/json/#"
    stream: {json}
    partition_key: id
  - name: transformed
    topic: "fz/json/+/t"
    stream: {transform}
    partition_key: "topic(`2`)"
    transform: "{{v: v, k: id, n: length(keys(@))}}"
    append_newline: true
  - name: raw
    topic: ["fz/raw/#", "fz/+/raw"]
    stream: {raw}
    format: raw
    partition_key: "topic(`-1`)"
    dead_letter:
      topic: fz-dlq/raw
  - name: hashed
    topic: "fz/hash/#"
    stream: {hash}
    partition_key: id
    explicit_hash_key: h
  - name: filtered
    topic: "fz/filter/#"
    stream: {filter}
    partition_key: "`static`"
    filter: "v > `10`"
"""


def _level(rng: random.Random, n: int | None = None) -> str:
    return "".join(rng.choice(TOPIC_CHARS) for _ in range(rng.randint(0, 10) if n is None else n))


def _topic(rng: random.Random) -> str:
    prefix = rng.choice(["fz/json/", "fz/raw/", "fz/hash/", "fz/filter/", "fz/json/x/t|", "fz/x/raw|",
                         "elsewhere/", "fz/"])
    if prefix.endswith("|"):
        return prefix[:-1].replace("x", _level(rng) or "x", 1)
    if rng.random() < 0.1:  # a last level (the raw route's key) around 256 characters
        return prefix + rng.choice(["k", "é", "😀"]) * rng.choice([256, 257])
    return prefix + "/".join(_level(rng) for _ in range(rng.randint(0, 3)))


def _key_value(rng: random.Random) -> Any:
    return rng.choice([
        lambda: _level(rng), lambda: "", lambda: None, lambda: True, lambda: rng.randint(-10**6, 10**6),
        lambda: 2**64 + 1, lambda: rng.random() * 1e300, lambda: [1], lambda: {"a": 1},
        lambda: "k" * rng.choice([255, 256, 257]), lambda: "😀" * rng.choice([64, 256, 257]),
    ])()


def _payload(rng: random.Random) -> bytes:
    kind = rng.choice(["json"] * 4 + ["bytes", "invalid-utf8", "deep", "huge-number", "nan",
                                      "not-object", "empty", "big"])
    if kind == "json":
        doc: dict[str, Any] = {_level(rng): _level(rng) for _ in range(rng.randint(0, 3))}
        for field, make in (("id", _key_value), ("h", lambda r: r.choice(
                [0, 2**128 - 1, 2**128, -1, "12", "007", "x", None])), ("v", lambda r: r.randint(0, 20))):
            if rng.random() < 0.7:
                doc[field] = make(rng)
        return json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
    if kind == "bytes":
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    if kind == "invalid-utf8":
        return b'{"id":"k\xff\xfe","v":11}'
    if kind == "deep":
        n = rng.choice([1000, 1025, 50_000])
        return b"[" * n + b"]" * n
    if kind == "huge-number":
        return b'{"id":' + b"9" * rng.choice([20, 400]) + b',"v":11}'
    if kind == "nan":
        return rng.choice([b'{"id":NaN}', b'{"id":1e400}', b'{"v":Infinity,"id":"k"}'])
    if kind == "not-object":
        return rng.choice([b"[]", b"42", b"null", b'"s"'])
    if kind == "empty":
        return rng.choice([b" ", b"{}", b"\x00"])
    key_bytes = 3  # "big" goes to the raw route with a 3-byte key: one byte under, at, over 1 MiB
    return b"x" * (MIB - key_bytes + rng.choice([-1, 0, 1]))


def _cases(rng: random.Random) -> list[tuple[str, bytes]]:
    cases = []
    for _ in range(N_CASES):
        payload = _payload(rng)
        topic = "fz/raw/big" if len(payload) > MIB // 2 else _topic(rng)
        cases.append((topic, payload))
    return cases


class _DeadLetterTopic:
    """Counts what the gateway publishes to its MQTT dead-letter topic."""

    def __init__(self, port: int) -> None:
        self.routes: Counter[str] = Counter()
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fuzz-dlq-watch")
        self.client.on_connect = lambda c, *_: c.subscribe("fz-dlq/#", qos=1)
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = lambda c, u, m: self.routes.update([json.loads(m.payload)["route"]])
        self.client.connect(HOST, port)
        self.client.loop_start()
        assert self._ready.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_generated_bad_messages_never_crash_the_gateway_and_every_count_matches(
        mosquitto: Mosquitto, make_stream: Callable[..., str], kinesis: Any,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher],
        tmp_path: Path) -> None:
    streams = {k: make_stream(suffix=f"-{k}") for k in ("json", "transform", "raw", "hash", "filter",
                                                          "dead")}
    text = ROUTES.format(**streams)
    routes = tmp_path / "routes.yaml"
    routes.write_text(text)
    table = load_routes_text(text, "routes.yaml").table
    assert table is not None
    rng = random.Random(SEED)
    cases = _cases(rng)
    print(f"[fuzz-live] seed={SEED} cases={len(cases)}")

    expected: dict[str, Counter[tuple[str, bytes]]] = {s: Counter() for s in streams.values()}
    dead: Counter[str] = Counter()
    received: Counter[str] = Counter()
    unrouted = 0
    for topic, payload in cases:
        outcomes = table.route(Message(topic, payload, 1, 0))
        unrouted += not outcomes
        for o in outcomes:
            received[o.route] += 1
            if isinstance(o, Record) and o.size <= MIB:
                expected[o.stream][(o.partition_key, o.data)] += 1
            elif isinstance(o, Record | Rejected):
                dead[o.route] += 1
    mqtt_dead = Counter({r: n for r, n in dead.items() if r == "raw"})
    kinesis_dead = sum(n for r, n in dead.items() if r != "raw")

    gw = gateway_process(routes, extra_env={"KINESIS_LINGER_MS": "20"})
    watch = _DeadLetterTopic(mosquitto.port)
    pub = publisher(topic_for=lambda seq: cases[seq][0], payload=lambda seq: cases[seq][1])
    pub.publish_range(len(cases))
    assert pub.wait_acked(60) and len(pub.acked) == len(cases)

    def landed() -> dict[str, Counter[tuple[str, bytes]]]:
        return {s: Counter((r["partition_key"], r["data"]) for r in read_all(kinesis, s))
                for s in streams.values()}

    want_total = sum(sum(c.values()) for c in expected.values()) + kinesis_dead
    deadline = time.monotonic() + 60
    while True:
        got = landed()
        total = sum(sum(c.values()) for c in got.values())
        if (total >= want_total and watch.routes == mqtt_dead) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    watch.close()
    for name, stream in streams.items():
        if name != "dead":
            assert got[stream] == expected[stream], f"stream {name}: records differ"
    envelopes = Counter(json.loads(data)["route"] for (_, data), n in got[streams["dead"]].items()
                        for _ in range(n))
    assert envelopes == Counter({r: n for r, n in dead.items() if r != "raw"})
    assert watch.routes == mqtt_dead

    assert gw.alive, gw.output_tail()
    output = gw.stdout_text() + gw.stderr_text()
    assert "Traceback" not in output
    bad = [e for e in gw.logs() if e.get("level") in ("ERROR", "CRITICAL")]
    assert not bad, bad[:5]
    for route, n in received.items():
        assert gw.metric("messages_received_total", route=route) == n, route
    for route, n in dead.items():
        assert gw.metric("records_dead_lettered_total", route=route) == n, route
    assert gw.metric("records_dropped_total") == 0
    # the gateway subscribes to exactly its routes' filters, so the broker never sends it a topic
    # no route matches ("elsewhere/...", "fz/" itself): those are the broker's to drop
    assert gw.metric("messages_unrouted_total") == 0
    assert gw.metric("backlog_records") == 0
    print(f"[fuzz-live] routed {sum(received.values())} outcomes, {want_total - kinesis_dead} records, "
          f"{sum(dead.values())} dead letters ({kinesis_dead} kinesis, {sum(mqtt_dead.values())} mqtt), "
          f"{unrouted} on topics no route subscribes to")
