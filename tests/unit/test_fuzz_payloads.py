"""Generated bad input through the real per-message path, in-process (docs/delivery.md#how-the-guarantees-are-tested).

Why in-process: ≥ 10,000 cases must run in CI within about a minute, so the broker and Kinesis are
replaced by the two ends the gateway talks to: messages go into the real ``Pipeline.intake`` (as
the MQTT thread calls it), routed by the real ``RouteTable`` of a route file, acked by the real
``AckTracker``, batched by the real ``KinesisSink`` into a scripted PutRecords client that checks
every request against the service's limits, fails a seeded share of entries the way a throttled
shard does, and records what it holds. A fake clock makes the sink's backoff instant.

What every case must show (the pipeline's invariant, pipeline.py docstring):
- no exception escapes and nothing is logged with a traceback;
- every QoS 1 message is acked exactly once, in arrival order; QoS 0 messages never;
- each record the router makes reaches its stream exactly once, unless it is over the record
  limit counting its key; each such record and each rejection lands in its route's dead letter
  (Kinesis stream or MQTT topic) exactly once, and is counted; nothing is dropped;
- no PutRecords request breaks a service limit: 1-500 entries, ≤ 5 MiB counting keys, each entry
  ≤ 1 MiB counting its UTF-8 key, keys 1-256 characters, hash keys decimal in 0..2^128-1.

Runs are derandomized (the same cases every run, so a CI failure reproduces locally); the total
number of cases is printed at the end of the module.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.model import Message, Record, Rejected
from gateway.pipeline.pipeline import Pipeline
from gateway.routefile.loader import load_routes_text
from gateway.routing.table import RouteTable
from gateway.settings.settings import SinkConfig
from gateway.sink.clients import RegionalClients
from gateway.sink.kinesis import KinesisSink
from gateway.source.acks import AckTracker

MIB = 1024 * 1024
MAX_REQUEST_BYTES = 5 * MIB
MAX_HASH_KEY = 2**128 - 1

ROUTES = """\
version: 1
defaults:
  qos: 1
  dead_letter:
    stream: fz-dead-letters
routes:
  - name: by-id                   # JSON, key from a payload field
    topic: "fz/json/#"
    stream: fz-json
    partition_key: id
  - name: transformed             # JSON, key from the topic, data made by a transform
    topic: "fz/json/+/t"
    stream: fz-transform
    partition_key: "topic(`2`)"
    transform: "{v: v, k: id, n: length(keys(@))}"
    append_newline: true
  - name: raw                     # never parsed; key is the last topic level; MQTT dead letter
    topic: ["fz/raw/#", "fz/+/raw"]
    stream: fz-raw
    format: raw
    partition_key: "topic(`-1`)"
    dead_letter:
      topic: fz-dlq/raw
  - name: hashed                  # explicit hash key from the payload
    topic: "fz/hash/#"
    stream: fz-hash
    partition_key: id
    explicit_hash_key: h
  - name: filtered                # filter expression
    topic: "fz/filter/#"
    stream: fz-filter
    partition_key: "`static`"
    filter: "v > `10`"
  - name: whole-topic             # every fz topic also here, keyed by the whole topic (QoS 0 route)
    topic: "fz/#"
    stream: fz-all
    format: raw
    partition_key: "topic()"
    qos: 0
"""

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])
CASES: Counter[str] = Counter()
MESSAGES: list[int] = [0]


@pytest.fixture(scope="module", autouse=True)
def _report_cases() -> Iterator[None]:
    yield
    total = sum(CASES.values())
    detail = ", ".join(f"{k}={v}" for k, v in sorted(CASES.items()))
    print(f"\n[fuzz] {total} generated cases, {MESSAGES[0]} messages through the pipeline ({detail})")


@pytest.fixture(scope="module")
def table() -> RouteTable:
    result = load_routes_text(ROUTES, "fuzz-routes.yaml")
    assert result.table is not None, [f.format_text() for f in result.findings]
    return result.table


# --- the two ends: a scripted Kinesis and a recording MQTT dead-letter publisher -----------------


class ScriptedKinesis:
    """PutRecords that checks the request limits, fails a seeded share of entries as throttled,
    and keeps what it accepted. Violations are recorded, not raised: the sink catches exceptions
    from the client and would just retry."""

    def __init__(self, seed: int, fail_share: float) -> None:
        self.rng = random.Random(seed)
        self.fail_share = fail_share
        self.held: list[tuple[str, str, bytes, str | None]] = []
        self.violations: list[str] = []
        self.requests = 0

    def put_records(self, **request: Any) -> dict[str, Any]:
        self.requests += 1
        stream = request.get("StreamName") or request.get("StreamARN")
        entries = request["Records"]
        total = 0
        if not 1 <= len(entries) <= 500:
            self.violations.append(f"{len(entries)} entries in one request")
        for e in entries:
            key, data, ehk = e["PartitionKey"], e["Data"], e.get("ExplicitHashKey")
            if not isinstance(data, bytes | bytearray):
                self.violations.append(f"data is {type(data).__name__}")
                continue
            if not isinstance(key, str) or not 1 <= len(key) <= 256:
                self.violations.append(f"partition key of {len(key)} characters")
            size = len(data) + len(key.encode("utf-8"))
            total += size
            if size > MIB:
                self.violations.append(f"entry of {size} bytes counting its key")
            if ehk is not None and not (ehk.isascii() and ehk.isdigit() and int(ehk) <= MAX_HASH_KEY):
                self.violations.append(f"explicit hash key {ehk[:50]!r}")
        if total > MAX_REQUEST_BYTES:
            self.violations.append(f"request of {total} bytes")
        results = []
        failed = 0
        for i, e in enumerate(entries):
            if self.rng.random() < self.fail_share:
                failed += 1
                results.append({"ErrorCode": "ProvisionedThroughputExceededException",
                                "ErrorMessage": "Rate exceeded for shard (scripted)"})
            else:
                self.held.append((stream, e["PartitionKey"], bytes(e["Data"]), e.get("ExplicitHashKey")))
                results.append({"SequenceNumber": str(len(self.held)), "ShardId": "shardId-000000000000"})
        return {"FailedRecordCount": failed, "Records": results}


class MqttDeadLetters:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, qos: int, done: Any) -> None:
        self.published.append((topic, payload))
        done(True, "Success")

    def wake(self) -> None:
        pass


class CountingMetrics:
    """Every metrics call the pipeline and the sink make, summed by (name, first label)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any) -> None:
            label = args[0] if args and isinstance(args[0], str) else ""
            n = args[-1] if name in _COUNTED_N and isinstance(args[-1], int) else 1
            self.counts[(name, label)] += n
        return record

    def total(self, name: str) -> int:
        return sum(v for (n, _), v in self.counts.items() if n == name)


_COUNTED_N = {"records_put", "records_failed", "records_dead_lettered", "records_dropped",
              "messages_received", "unrouted", "records_retried"}


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 1e-6)


class TracebackCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.bad.append(f"{record.levelname} {record.name}: {record.getMessage()[:300]}")


@pytest.fixture(scope="module")
def catcher() -> Iterator[TracebackCatcher]:
    handler = TracebackCatcher()
    logger = logging.getLogger("gateway")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# --- running one batch of messages and checking every invariant -------------------------------


class _Active:
    def __init__(self, table: RouteTable) -> None:
        self.current = table


def run_and_check(table: RouteTable, catcher: TracebackCatcher,
                  messages: list[tuple[str, bytes, int]], seed: int = 0,
                  fail_share: float = 0.0) -> None:
    """Feed `messages` (topic, payload, qos) through a fresh pipeline and check the invariants."""
    catcher.bad.clear()
    MESSAGES[0] += len(messages)
    clock = FakeClock()
    kinesis = ScriptedKinesis(seed, fail_share)
    acked: list[tuple[int, int]] = []
    acks = AckTracker(SimpleNamespace(ack_many=acked.extend))
    metrics = CountingMetrics()
    mqtt_dlq = MqttDeadLetters()
    pipeline = Pipeline(_Active(table), acks, metrics, outbound=mqtt_dlq, backlog_capacity=10**9,
                        make_sink=lambda on_settled: KinesisSink(
                            RegionalClients.sharing(kinesis),
                            SinkConfig(linger_s=0.05, backoff_base_s=0.1, backoff_cap_s=1.0),
                            on_settled=on_settled, metrics=metrics,
                            clock=clock.now, sleep=clock.sleep, rng=random.Random(seed)))
    sink = pipeline.sink

    expected_held: Counter[tuple[str, str, bytes, str | None]] = Counter()
    expected_dead: Counter[str] = Counter()     # route name -> dead letters
    expected_received: Counter[str] = Counter()
    oversize = 0
    unrouted = 0
    for mid, (topic, payload, qos) in enumerate(messages, start=1):
        message = Message(topic, payload, qos, 1_700_000_000_000)
        outcomes = table.route(message)  # what the router says, to compare the ends against
        if not outcomes:
            unrouted += 1
        for outcome in outcomes:
            expected_received[outcome.route] += 1
            if isinstance(outcome, Record):
                size = len(outcome.data) + len(outcome.partition_key.encode("utf-8"))
                assert size == outcome.size, "Record.size must be data + UTF-8 key bytes"
                if size > MIB:
                    expected_dead[outcome.route] += 1
                    oversize += 1
                else:
                    expected_held[(outcome.stream, outcome.partition_key, outcome.data,
                                   outcome.explicit_hash_key)] += 1
            elif isinstance(outcome, Rejected):
                assert "\n" not in outcome.reason and len(outcome.reason) < 200
                expected_dead[outcome.route] += 1
        pipeline.intake(message, mid, qos)  # must never raise
        pipeline.after_read()               # as the source does after each read round
    assert sink.drain(1e9), "sink did not settle every record"
    pipeline.flush()  # per-message counts reach the metrics on the app's tick

    # nothing broke a PutRecords limit, and no traceback or error was logged
    assert kinesis.violations == []
    assert catcher.bad == []
    # every QoS 1 message acked exactly once, in arrival order; QoS 0 never
    qos1 = [mid for mid, (_, _, q) in enumerate(messages, start=1) if q >= 1]
    assert [mid for mid, _ in acked] == qos1
    assert acks.pending == 0 and pipeline.held == 0
    # Kinesis holds exactly the deliverable records, each once (no duplicates from retries)
    held = Counter(e for e in kinesis.held if e[0] != "fz-dead-letters")
    assert held == expected_held
    # every rejected or undeliverable record is in its route's dead letter exactly once
    dead: Counter[str] = Counter()
    for stream, key, data, _ in kinesis.held:
        if stream == "fz-dead-letters":
            envelope = json.loads(data)
            assert envelope["topic"][:256] == key
            dead[envelope["route"]] += 1
    for topic, data in mqtt_dlq.published:
        assert topic == "fz-dlq/raw"
        dead[json.loads(data)["route"]] += 1
    assert dead == expected_dead
    # ...and counted: dead letters by route, nothing dropped, received and unrouted as routed
    assert {r: n for (name, r), n in metrics.counts.items() if name == "records_dead_lettered"} \
        == dict(expected_dead)
    assert metrics.total("records_dropped") == 0
    assert {r: n for (name, r), n in metrics.counts.items() if name == "messages_received"} \
        == dict(expected_received)
    assert metrics.total("unrouted") == unrouted
    assert metrics.total("records_failed") == oversize  # the sink's own refusals


# --- strategies ----------------------------------------------------------------------------------

TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
LEVEL = st.text(TEXT, max_size=12).filter(lambda s: "/" not in s)


def _key_like() -> st.SearchStrategy[Any]:
    """Values for a partition key field: every type, empty, and both sides of 256 characters."""
    return st.one_of(
        st.text(TEXT, max_size=20),
        st.sampled_from([255, 256, 257]).flatmap(lambda n: st.sampled_from(["k" * n, "é" * n, "😀" * n])),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.booleans(), st.none(), st.just(""), st.just([]), st.just({}),
        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )


def _hash_like() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(min_value=-5, max_value=2**129),
        st.sampled_from([MAX_HASH_KEY, MAX_HASH_KEY + 1, 0, -1]),
        st.sampled_from([str(MAX_HASH_KEY), str(MAX_HASH_KEY + 1), "0", "007", "", " 1", "1e3", "١٢٣"]),
        st.text(max_size=5), st.none(), st.floats(allow_nan=False, allow_infinity=False),
    )


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(TEXT, max_size=30))
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(TEXT, max_size=8), inner, max_size=4)),
    max_leaves=12)


@st.composite
def json_documents(draw: st.DrawFn) -> bytes:
    doc: dict[str, Any] = draw(st.dictionaries(st.text(TEXT, max_size=8), JSON_ANY, max_size=4))
    if draw(st.booleans()):
        doc["id"] = draw(_key_like())
    if draw(st.booleans()):
        doc["h"] = draw(_hash_like())
    if draw(st.booleans()):
        doc["v"] = draw(st.one_of(st.integers(min_value=-100, max_value=100), JSON_LEAF))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8")


@st.composite
def nasty_payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "invalid-utf8", "deep", "deep-object", "huge-number",
                                 "nan", "not-object", "bom", "empty", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "invalid-utf8":
        good = draw(json_documents())
        cut = draw(st.integers(min_value=0, max_value=len(good)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
        return good[:cut] + bad + good[cut:]
    if kind == "deep":
        n = draw(st.sampled_from([1, 100, 1023, 1024, 1025, 5000, 100_000]))
        return b"[" * n + b"]" * n
    if kind == "deep-object":
        n = draw(st.sampled_from([10, 500, 1100, 3000]))
        return b'{"id":"k","v":' + b'{"a":' * n + b"1" + b"}" * n + b"}"
    if kind == "huge-number":
        digits = draw(st.sampled_from([19, 20, 39, 40, 400, 5000]))
        field = draw(st.sampled_from(["id", "h", "v"]))
        return b'{"id":"k","%s":%s}' % (field.encode(), b"9" * digits)
    if kind == "nan":
        return draw(st.sampled_from([b'{"id":NaN}', b'{"id":Infinity}', b'{"v":-Infinity,"id":"k"}',
                                     b'{"id":1e400}', b'{"id":-0.0}', b'{"id":1E-400}']))
    if kind == "not-object":
        return draw(st.sampled_from([b"[]", b'"id"', b"42", b"null", b"true", b'[{"id":"k"}]']))
    if kind == "bom":
        return b"\xef\xbb\xbf" + draw(json_documents())
    if kind == "empty":
        return draw(st.sampled_from([b"", b" ", b"\n", b"\x00", b"{}"]))
    good = draw(json_documents())
    return good[: draw(st.integers(min_value=0, max_value=max(0, len(good) - 1)))]


PAYLOADS = st.one_of(json_documents(), nasty_payloads())


@st.composite
def topics(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["json", "json-t", "raw", "raw2", "hash", "filter", "fz",
                                 "random", "dollar", "long", "edge"]))
    levels = draw(st.lists(LEVEL, max_size=4))
    tail = "/".join(levels)
    if kind == "json":
        return f"fz/json/{tail}"
    if kind == "json-t":
        return f"fz/json/{draw(LEVEL)}/t"
    if kind == "raw":
        return f"fz/raw/{tail}"
    if kind == "raw2":
        return f"fz/{draw(LEVEL)}/raw"
    if kind == "hash":
        return f"fz/hash/{tail}"
    if kind == "filter":
        return f"fz/filter/{tail}"
    if kind == "fz":
        return draw(st.sampled_from(["fz", "fz/", "fz//", "fz/json", "fz/raw", "/fz", "FZ/json/a"]))
    if kind == "dollar":  # `#` and `+` never match $-topics (MQTT 4.7.2)
        return draw(st.sampled_from(["$SYS/fz/json/a", "$fz/json/a", "$share/g/fz/json/a", "$"])) + tail
    if kind == "long":    # last level (the raw route's key) and whole topic around 256 characters
        n = draw(st.sampled_from([255, 256, 257, 1000]))
        ch = draw(st.sampled_from(["k", "é", "😀"]))
        prefix = draw(st.sampled_from(["fz/raw/", "fz/json/", "fz/"]))
        return prefix + ch * n
    if kind == "edge":
        return draw(st.sampled_from(["/", "//", "fz/json/+", "fz/json/#", "fz/json/\u202e", "fz/raw/\ufeff",
                                     "fz/raw/ ", "fz/raw/\t"]))
    return draw(st.text(TEXT, min_size=1, max_size=40))


@st.composite
def boundary_cases(draw: st.DrawFn) -> tuple[str, bytes]:
    """Records at exactly 1 MiB counting the key, one byte under and one over, multi-byte keys."""
    delta = draw(st.sampled_from([-1, 0, 1]))
    ch = draw(st.sampled_from(["k", "é", "😀"]))
    key = ch * draw(st.sampled_from([1, 255, 256]))
    key_bytes = len(key.encode())
    route = draw(st.sampled_from(["raw", "by-id", "transformed"]))
    if route == "raw":
        topic = "fz/raw/" + key
        return topic, b"x" * (MIB - key_bytes + delta)
    if route == "by-id":
        head, tail = b'{"id":' + json.dumps(key, ensure_ascii=False).encode() + b',"p":"', b'"}'
        pad = MIB - key_bytes + delta - len(head) - len(tail)
        return "fz/json/" + draw(st.sampled_from(["a", "b/c"])), head + b"x" * pad + tail
    # transformed: key is topic level 2 ("json"), data = compact JSON of {v, k, n} + newline
    head, tail = b'{"id":"k","v":"', b'"}'
    overhead = len(b'{"v":"') + len(b'","k":"k","n":2}') + 1  # transform output + appended newline
    pad = MIB - len(b"json") + delta - overhead
    return "fz/json/x/t", head + b"x" * pad + tail


# --- the tests -----------------------------------------------------------------------------------


@settings(FUZZ, max_examples=5000)
@given(topic=topics(), payload=PAYLOADS, qos=st.sampled_from([0, 1, 1]))
def test_any_single_message_is_delivered_or_dead_lettered_and_acked_once(
        table: RouteTable, catcher: TracebackCatcher, topic: str, payload: bytes, qos: int) -> None:
    CASES["single"] += 1
    run_and_check(table, catcher, [(topic, payload, qos)])


@settings(FUZZ, max_examples=3300)
@given(topic=topics(), qos=st.sampled_from([0, 1]))
def test_any_topic_routes_without_crashing(table: RouteTable, catcher: TracebackCatcher, topic: str,
                                           qos: int) -> None:
    CASES["topic"] += 1
    run_and_check(table, catcher, [(topic, b'{"id":"k","v":11,"h":"5"}', qos),
                                   (topic, b"raw \xff bytes", qos)])


@settings(FUZZ, max_examples=600)
@given(case=boundary_cases(), qos=st.sampled_from([0, 1]))
def test_records_at_the_one_mib_limit_counting_the_key_go_through_one_byte_over_is_dead_lettered(
        table: RouteTable, catcher: TracebackCatcher, case: tuple[str, bytes], qos: int) -> None:
    CASES["boundary"] += 1
    topic, payload = case
    run_and_check(table, catcher, [(topic, payload, qos), ("fz/json/after", b'{"id":"ok"}', 1)])


@settings(FUZZ, max_examples=1500)
@given(messages=st.lists(st.tuples(topics(), PAYLOADS, st.sampled_from([0, 1, 1])), min_size=1,
                         max_size=40),
       seed=st.integers(min_value=0, max_value=2**32 - 1),
       fail_share=st.sampled_from([0.0, 0.0, 0.1, 0.5]))
def test_message_sequences_with_throttled_entries_keep_acks_in_order_without_duplicates(
        table: RouteTable, catcher: TracebackCatcher, messages: list[tuple[str, bytes, int]],
        seed: int, fail_share: float) -> None:
    CASES["sequence"] += 1
    run_and_check(table, catcher, messages, seed=seed, fail_share=fail_share)


@settings(FUZZ, max_examples=400)
@given(n=st.sampled_from([499, 500, 501, 1000, 1001]), size=st.sampled_from([10, 10_000, 1_048_000]),
       seed=st.integers(min_value=0, max_value=2**16))
def test_many_records_are_cut_into_requests_within_500_entries_and_5_mib(
        table: RouteTable, catcher: TracebackCatcher, n: int, size: int, seed: int) -> None:
    CASES["batch"] += 1
    if size > 100_000:
        n = min(n, 12)  # 12 records of ~1 MiB already need three requests
    payload = b"y" * size
    run_and_check(table, catcher, [(f"fz/raw/k{i % 7}", payload, 1) for i in range(n)], seed=seed,
                  fail_share=0.05)


def test_dead_letter_envelope_fits_one_kinesis_record_whatever_the_topic(
        table: RouteTable, catcher: TracebackCatcher) -> None:
    CASES["dead-letter-size"] += 1
    run_and_check(table, catcher, [("fz/json/" + "\x01" * 65_000, b"{" + b"x" * 600_000, 1)])
