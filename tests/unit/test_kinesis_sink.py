"""KinesisSink behaviour against a scripted fake client and a fake clock (no network, no sleeps)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import orjson
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from gateway.model import PUT, Failed, Message, Record, Rejected
from gateway.routing.expressions import compile_expression as expr
from gateway.routing.table import Route, RouteTable
from gateway.settings.settings import SinkConfig
from gateway.sink.clients import RegionalClients
from gateway.sink.kinesis import KinesisSink
from gateway.sink.retry import Action, classify

MiB = 1024 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class MaxRng:
    """Full jitter at its ceiling, so the ceiling each retry used is visible."""

    def __init__(self) -> None:
        self.ceilings: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.ceilings.append(b)
        return b


def client_error(code: str, status: int = 400, message: str = "boom") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutRecords",
    )


def ok(request: dict[str, Any]) -> dict[str, Any]:
    n = len(request["Records"])
    records = [{"SequenceNumber": str(i), "ShardId": "shardId-000000000000"} for i in range(n)]
    return {"FailedRecordCount": 0, "Records": records}


class FakeKinesis:
    """Records every request; each call consumes one scripted step (exception, callable or None=ok)."""

    def __init__(self, *script: Any, default: Any = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script = list(script)
        self.default = default
        self.lock = threading.Lock()

    def put_records(self, **request: Any) -> dict[str, Any]:
        with self.lock:
            self.requests.append(request)
            step = self.script.pop(0) if self.script else self.default
        if isinstance(step, BaseException):
            raise step
        if callable(step):
            return step(request)
        return ok(request)

    def data_sent(self) -> list[list[bytes]]:
        return [[r["Data"] for r in req["Records"]] for req in self.requests]


def fail_entries(*indexes: int, code: str = "ProvisionedThroughputExceededException"):
    def respond(request: dict[str, Any]) -> dict[str, Any]:
        response = ok(request)
        for i in indexes:
            response["Records"][i] = {"ErrorCode": code, "ErrorMessage": "slow down"}
        response["FailedRecordCount"] = len(indexes)
        return response

    return respond


def rec(
    data: bytes = b"x", pk: str = "k", stream: str = "s", route: str = "r", ehk: str | None = None
) -> Record:
    return Record(route, stream, pk, data, ehk)


class Harness:
    def __init__(self, client: Any, aggregate_routes: frozenset[str] = frozenset(), **config: Any) -> None:
        self.clock = FakeClock()
        self.rng = MaxRng()
        self.calls: list[list[tuple[Any, Any]]] = []
        self.client = client
        self.sink = KinesisSink(
            RegionalClients.sharing(client),
            SinkConfig(**config),
            self.calls.append,
            aggregate_routes=aggregate_routes,
            clock=self.clock,
            sleep=self.clock.sleep,
            rng=self.rng,
        )

    def put(self, records: list[Record]) -> None:
        first = len(self.settled) + self.sink.pending_records
        self.sink.put([(r, i) for i, r in enumerate(records, start=first)])

    def after(self, seconds: float) -> int:
        self.clock.now += seconds
        return self.sink.step()

    @property
    def settled(self) -> list[tuple[Any, Any]]:
        return [pair for call in self.calls for pair in call]

    def outcome(self) -> dict[Any, Any]:
        result = dict(self.settled)
        assert len(result) == len(self.settled), "a token was settled twice"
        return result


# ---- batch boundaries ---------------------------------------------------------------------


@pytest.mark.parametrize(("count", "requests"), [(500, 1), (501, 2)])
def test_records_are_split_at_500_per_request(count: int, requests: int) -> None:
    h = Harness(FakeKinesis())
    h.put([rec(str(i).encode()) for i in range(count)])
    assert h.sink.step() == 1  # a full batch goes at once, without waiting for linger
    assert h.after(0.051) == requests - 1
    assert [len(r["Records"]) for r in h.client.requests] == [500, count - 500][:requests]
    assert len(h.outcome()) == count and set(h.outcome().values()) == {PUT}


@pytest.mark.parametrize(("last_size", "requests"), [(5, 1), (6, 2)])
def test_request_bytes_are_capped_at_5_mib_counting_keys(last_size: int, requests: int) -> None:
    h = Harness(FakeKinesis())
    big = [rec(b"d" * (MiB - 2), pk="k") for _ in range(5)]  # 5 x (1 MiB - 1) including keys
    h.put(big + [rec(b"e" * (last_size - 1), pk="k")])  # total 5 MiB, or 5 MiB + 1
    h.sink.step()
    h.after(0.051)
    assert len(h.client.requests) == requests
    for request in h.client.requests:
        assert sum(len(r["Data"]) + len(r["PartitionKey"]) for r in request["Records"]) <= 5 * MiB
    assert set(h.outcome().values()) == {PUT}


def test_record_exactly_at_1_mib_counting_utf8_key_is_sent_and_one_more_byte_fails() -> None:
    h = Harness(FakeKinesis())
    key = "é"  # two UTF-8 bytes, one character
    h.put([rec(b"a" * (MiB - 2), pk=key), rec(b"a" * (MiB - 1), pk=key)])
    h.sink.drain(1.0)
    assert h.outcome() == {0: PUT, 1: Failed("record too large", permanent=True)}
    assert [len(r["Records"]) for r in h.client.requests] == [1]


@pytest.mark.parametrize(
    ("key", "hash_key", "code"),
    [
        ("k" * 257, None, "key_too_long"),
        ("", None, "key_empty"),
        ("k", str(2**128), "hash_key"),
        ("k", "-1", "hash_key"),
        ("k", "12a", "hash_key"),
    ],
)
def test_the_router_rejects_keys_kinesis_refuses_so_none_reaches_a_batch(
    key: str, hash_key: str | None, code: str
) -> None:
    """The sink trusts a Record (gateway/model.py): keys and hash keys are the router's to check."""
    route = Route("r", ("#",), "s", expr("k"), explicit_hash_key=expr("h") if hash_key is not None else None)
    (outcome,) = RouteTable((route,)).route(Message("t", orjson.dumps({"k": key, "h": hash_key}), 1, 0))
    assert isinstance(outcome, Rejected) and outcome.code == code


def test_keys_and_hash_keys_at_their_limits_are_sent_with_their_neighbours() -> None:
    h = Harness(FakeKinesis())
    h.put([rec(b"good1"), rec(b"good2", pk="k" * 256, ehk=str(2**128 - 1)), rec(b"good3", ehk="0")])
    h.sink.drain(1.0)
    assert h.outcome() == {0: PUT, 1: PUT, 2: PUT}
    assert h.client.data_sent() == [[b"good1", b"good2", b"good3"]]


def test_oversize_record_fails_permanently_and_never_joins_a_batch() -> None:
    h = Harness(FakeKinesis(), max_record_bytes=1000, max_batch_bytes=10_000)
    h.put([rec(b"good1"), rec(b"x" * 1000), rec(b"good2")])
    h.sink.drain(1.0)
    assert h.outcome() == {0: PUT, 1: Failed("record too large", permanent=True), 2: PUT}
    assert h.client.data_sent() == [[b"good1", b"good2"]]


def test_batch_waits_for_linger_before_sending() -> None:
    h = Harness(FakeKinesis(), linger_s=0.05)
    h.put([rec()])
    assert h.sink.step() == 0
    assert h.after(0.04) == 0
    assert h.after(0.011) == 1


def test_send_now_skips_the_linger_once() -> None:
    h = Harness(FakeKinesis(), linger_s=10.0)
    h.put([rec(b"a"), rec(b"b", stream="other")])
    assert h.sink.step() == 0
    h.sink.send_now()                          # the pipeline's backlog is full
    assert h.sink.step() == 2                  # every stream's partial batch goes at once
    h.put([rec(b"c")])
    assert h.sink.step() == 0                  # later records wait for the linger again
    assert h.after(10.0) == 1


def test_send_now_skips_the_linger_of_aggregates_too() -> None:
    h = Harness(FakeKinesis(), linger_s=10.0, aggregate_routes=frozenset({"r"}))
    h.put([rec(b"a"), rec(b"b")])
    h.sink.send_now()
    h.sink.step()
    assert len(h.settled) == 2


def test_stream_arn_goes_in_stream_arn_and_name_in_stream_name() -> None:
    arn = "arn:aws:kinesis:us-east-1:123456789012:stream/telemetry"
    h = Harness(FakeKinesis())
    h.put([rec(stream=arn), rec(stream="plain")])
    h.sink.drain(1.0)
    targets = sorted((k, v) for req in h.client.requests for k, v in req.items() if k != "Records")
    assert targets == [("StreamARN", arn), ("StreamName", "plain")]


def test_settlements_are_delivered_in_bulk_once_per_response() -> None:
    h = Harness(FakeKinesis())
    h.put([rec(str(i).encode()) for i in range(10)])
    h.sink.drain(1.0)
    assert len(h.calls) == 1 and len(h.calls[0]) == 10


# ---- retries ------------------------------------------------------------------------------


def test_only_failed_entries_are_resent_and_successes_never_twice() -> None:
    h = Harness(FakeKinesis(fail_entries(1, 3), fail_entries(0)))
    h.put([rec(str(i).encode()) for i in range(5)])
    h.sink.drain(60.0)
    assert h.client.data_sent() == [[b"0", b"1", b"2", b"3", b"4"], [b"1", b"3"], [b"1"]]
    assert [len(c) for c in h.calls] == [3, 1, 1]
    assert h.outcome() == {i: PUT for i in range(5)}


def test_partial_failure_backoff_is_full_jitter_growing_to_the_cap() -> None:
    h = Harness(FakeKinesis(*[fail_entries(0)] * 9), backoff_base_s=0.1, backoff_cap_s=10.0)
    h.put([rec()])
    h.sink.drain(600.0)
    assert h.rng.ceilings == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0])
    assert h.outcome() == {0: PUT}


def test_retry_waits_out_its_backoff() -> None:
    h = Harness(FakeKinesis(fail_entries(0)), linger_s=0.0)
    h.put([rec()])
    assert h.sink.step() == 1
    assert h.after(0.09) == 0  # ceiling 0.1 s and MaxRng picks the ceiling
    assert h.after(0.011) == 1


@pytest.mark.parametrize(
    "error",
    [
        client_error("ProvisionedThroughputExceededException"),
        client_error("LimitExceededException"),
        client_error("KMSThrottlingException"),
        client_error("InternalFailure", 500),
        client_error("ExpiredTokenException"),
        EndpointConnectionError(endpoint_url="https://kinesis"),
        ReadTimeoutError(endpoint_url="https://kinesis"),
    ],
)
def test_whole_request_transient_errors_retry_the_whole_batch_with_backoff(error: Exception) -> None:
    h = Harness(FakeKinesis(error, error), linger_s=0.0)
    h.put([rec(b"a"), rec(b"b")])
    assert h.sink.step() == 1
    assert h.after(0.09) == 0 and h.after(0.011) == 1  # first retry: ceiling 0.1 s
    assert h.after(0.19) == 0 and h.after(0.011) == 1  # second: 0.2 s
    assert h.client.data_sent() == [[b"a", b"b"]] * 3
    assert h.outcome() == {0: PUT, 1: PUT}
    assert h.sink.healthy


def test_access_denied_holds_records_unsettled_then_delivers_when_fixed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    denied = client_error("AccessDeniedException", message="not authorized to perform kinesis:PutRecords")
    h = Harness(FakeKinesis(denied, denied, denied), linger_s=0.0, backoff_cap_s=10.0)
    with caplog.at_level(logging.INFO, logger="gateway.sink"):
        h.put([rec(b"a")])
        assert h.sink.step() == 1
        assert not h.sink.healthy and "AccessDeniedException" in (h.sink.last_error or "")
        assert h.after(9.9) == 0  # held: retried only at the cap
        assert h.after(0.101) == 1
        assert h.after(10.001) == 1
        assert h.calls == [] and h.sink.pending_records == 1
        assert h.after(10.001) == 1
    assert h.outcome() == {0: PUT}
    assert h.sink.healthy and h.sink.last_error is None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once per state change, not per retry
    assert any("succeed again" in r.getMessage() for r in caplog.records)


def test_unknown_exception_holds_instead_of_dropping() -> None:
    h = Harness(FakeKinesis(RuntimeError("bug")), linger_s=0.0)
    h.put([rec()])
    h.sink.step()
    assert h.calls == [] and not h.sink.healthy
    assert h.after(10.001) == 1
    assert h.outcome() == {0: PUT}


@pytest.mark.parametrize("failed_record_count", [None, 0, 1])
def test_each_entry_settles_by_its_own_result_whatever_failed_record_count_says(
    failed_record_count: int | None,
) -> None:
    """An entry is PUT only with a SequenceNumber and no ErrorCode; an entry with neither is retried."""

    def respond(request: dict[str, Any]) -> dict[str, Any]:
        results = [{"SequenceNumber": "1", "ShardId": "shardId-000000000000"},
                   {"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "slow down"},
                   {}]
        response: dict[str, Any] = {"Records": results}
        if failed_record_count is not None:
            response["FailedRecordCount"] = failed_record_count
        return response

    h = Harness(FakeKinesis(respond), linger_s=0.0)
    h.put([rec(b"0"), rec(b"1"), rec(b"2")])
    assert h.sink.step() == 1
    assert h.outcome() == {0: PUT}
    assert h.after(1.0) == 1
    assert h.client.data_sent() == [[b"0", b"1", b"2"], [b"1", b"2"]]
    assert h.outcome() == {0: PUT, 1: PUT, 2: PUT}


def test_malformed_response_holds_the_batch_instead_of_guessing() -> None:
    h = Harness(FakeKinesis(lambda request: {"FailedRecordCount": 0, "Records": []}), linger_s=0.0)
    h.put([rec()])
    h.sink.step()
    assert h.calls == [] and h.sink.pending_records == 1 and not h.sink.healthy
    assert h.after(10.001) == 1
    assert h.outcome() == {0: PUT}


def test_a_failing_stream_is_not_hammered() -> None:
    h = Harness(FakeKinesis(default=client_error("ProvisionedThroughputExceededException")))
    h.put([rec()])
    assert h.sink.drain(60.0) is False
    # ceilings 0.1, 0.2, ... 6.4 (12.7 s in all), then one request per 10 s cap
    assert len(h.client.requests) <= 8 + 5
    assert h.sink.pending_records == 1 and h.calls == []


def test_validation_exception_is_bisected_to_the_offending_record() -> None:
    def respond(request: dict[str, Any]) -> dict[str, Any]:
        if any(r["Data"] == b"poison" for r in request["Records"]):
            raise client_error("ValidationException")
        return ok(request)

    h = Harness(FakeKinesis(default=respond))
    data = [b"0", b"1", b"2", b"poison", b"4", b"5", b"6", b"7"]
    h.put([rec(d) for d in data])
    h.sink.drain(1.0)
    outcome = h.outcome()
    assert outcome.pop(3) == Failed("rejected by Kinesis (ValidationException)", permanent=True)
    assert outcome == {i: PUT for i in (0, 1, 2, 4, 5, 6, 7)}
    delivered = [d for req in h.client.data_sent() for d in req if b"poison" not in req]
    assert sorted(delivered) == sorted(d for d in data if d != b"poison")  # each exactly once


def test_record_past_its_time_budget_fails_as_not_permanent() -> None:
    throttled = client_error("ProvisionedThroughputExceededException")
    h = Harness(FakeKinesis(default=throttled), linger_s=0.0, record_ttl_s=1.0)
    h.put([rec()])
    assert h.sink.drain(30.0)
    assert h.outcome() == {0: Failed("delivery time budget exceeded", permanent=False)}


# ---- drain, threads, metrics --------------------------------------------------------------


def test_drain_gives_up_at_the_deadline_leaving_records_unsettled() -> None:
    h = Harness(FakeKinesis(default=client_error("AccessDeniedException")))
    h.put([rec()])
    start = h.clock.now
    assert h.sink.drain(25.0) is False
    assert h.clock.now - start == pytest.approx(25.0)
    assert h.calls == [] and h.sink.pending_records == 1


def test_worker_threads_deliver_concurrent_puts_exactly_once() -> None:
    client = FakeKinesis(fail_entries(0), client_error("InternalFailure", 500))
    settled: list[tuple[Any, Any]] = []
    lock = threading.Lock()

    def on_settled(batch: list[tuple[Any, Any]]) -> None:
        with lock:
            settled.extend(batch)

    config = SinkConfig(linger_s=0.001, max_in_flight=3, backoff_base_s=0.001, backoff_cap_s=0.01)
    sink = KinesisSink(RegionalClients.sharing(client), config, on_settled)
    sink.start()

    def producer(n: int) -> None:
        for i in range(50):
            sink.put([(rec(b"%d-%d" % (n, i), stream=f"s{n % 2}"), (n, i))])

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert sink.drain(10.0)
        assert sink.alive
    finally:
        sink.close()
    assert len(settled) == 200 and len(dict(settled)) == 200
    assert {s for _, s in settled} == {PUT}


def test_lingering_batches_go_out_on_their_own_with_idle_workers_waiting() -> None:
    """One idle worker holds the linger timer and hands it on; no deadline may be missed
    (nothing here forces a send: a lost timer would leave records queued forever)."""
    client = FakeKinesis(fail_entries(0))
    settled: list[tuple[Any, Any]] = []
    done = threading.Event()

    def on_settled(batch: list[tuple[Any, Any]]) -> None:
        settled.extend(batch)
        if len(settled) >= 30:
            done.set()

    config = SinkConfig(linger_s=0.03, max_in_flight=4, backoff_base_s=0.01, backoff_cap_s=0.02)
    sink = KinesisSink(RegionalClients.sharing(client), config, on_settled)
    sink.start()
    try:
        for i in range(30):
            sink.put([(rec(b"%d" % i, stream=f"s{i % 3}"), i)])
            time.sleep(0.005 * (i % 4))
        assert done.wait(10.0), f"only {len(settled)} of 30 settled"
    finally:
        sink.close()
    assert sorted(t for t, _ in settled) == list(range(30))
    assert {s for _, s in settled} == {PUT}


class RecordingMetrics:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def records_put(self, route: str, stream: str, n: int) -> None:
        self.calls.append(("put", route, stream, n))

    def records_failed(self, route: str, stream: str, reason: str, n: int) -> None:
        self.calls.append(("failed", route, stream, reason, n))

    def records_retried(self, stream: str, n: int) -> None:
        self.calls.append(("retried", stream, n))

    def batch_sent(self, stream: str, n_records: int, seconds: float) -> None:
        self.calls.append(("batch", stream, n_records))

    def callback_error(self) -> None:
        self.calls.append(("callback_error",))


def test_a_raising_settlement_callback_is_logged_in_one_line_counted_and_fails_liveness(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = RecordingMetrics()
    clock = FakeClock()
    calls: list[int] = []

    def on_settled(batch: list[tuple[Any, Any]]) -> None:
        calls.append(len(batch))
        raise RuntimeError("pipeline bug\nsecond line")

    sink = KinesisSink(RegionalClients.sharing(FakeKinesis()), SinkConfig(linger_s=0.0), on_settled, metrics,
                       clock=clock, sleep=clock.sleep, rng=MaxRng())
    assert sink.alive
    with caplog.at_level(logging.INFO, logger="gateway.sink"):
        sink.put([(rec(b"a"), 1)])
        assert sink.drain(1.0)
        sink.put([(rec(b"b"), 2)])
        assert sink.drain(1.0)
    assert calls == [1, 1]  # later settlements are still handed over
    assert metrics.calls.count(("callback_error",)) == 2
    assert not sink.alive and not sink.healthy
    assert "RuntimeError: pipeline bug" in (sink.last_error or "")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # the first one; the rest are counted
    assert errors[0].exc_info is None and "\n" not in errors[0].getMessage()
    assert "pipeline bug" in errors[0].getMessage()


def test_metrics_count_user_records_by_route_and_stream() -> None:
    metrics = RecordingMetrics()
    clock = FakeClock()
    client = FakeKinesis(fail_entries(1))
    sink = KinesisSink(RegionalClients.sharing(client), SinkConfig(), lambda _: None, metrics,
                       clock=clock, sleep=clock.sleep, rng=MaxRng())
    sink.put([(rec(route="a"), 1), (rec(route="b"), 2), (rec(b"x" * MiB), 3)])
    sink.drain(5.0)
    assert ("failed", "r", "s", "too_large", 1) in metrics.calls
    assert ("put", "a", "s", 1) in metrics.calls and ("put", "b", "s", 1) in metrics.calls
    assert ("retried", "s", 1) in metrics.calls
    assert [c for c in metrics.calls if c[0] == "batch"] == [("batch", "s", 2), ("batch", "s", 1)]


@pytest.mark.parametrize(
    ("code", "action"),
    [
        ("ValidationException", Action.BISECT),
        ("InvalidArgumentException", Action.BISECT),
        ("ResourceNotFoundException", Action.HOLD),
        ("KMSAccessDeniedException", Action.HOLD),
        ("KMSDisabledException", Action.HOLD),
        ("KMSThrottlingException", Action.RETRY),
        ("ServiceUnavailable", Action.RETRY),
        ("SomethingNew", Action.HOLD),
    ],
)
def test_errors_are_classified_so_config_errors_hold(code: str, action: Action) -> None:
    assert classify(client_error(code))[0] is action


# ---- real request shapes ------------------------------------------------------------------


def test_requests_are_accepted_by_moto(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto import mock_aws

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KINESIS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("kinesis", region_name="us-east-1")
        client.create_stream(StreamName="shapes", ShardCount=2)
        arn = client.describe_stream_summary(StreamName="shapes")["StreamDescriptionSummary"]["StreamARN"]
        settled: list[tuple[Any, Any]] = []
        sink = KinesisSink(RegionalClients.sharing(client), SinkConfig(), settled.extend)
        records = [rec(b"n%d" % i, pk=f"k{i}", stream="shapes") for i in range(600)]
        records += [rec(b"arn", pk="ü", stream=arn, ehk="0"), rec(b"x" * (MiB - 1), pk="k", stream="shapes")]
        sink.put([(r, i) for i, r in enumerate(records)])
        assert sink.drain(30.0)
        assert len(settled) == len(records) and {s for _, s in settled} == {PUT}
        total = 0
        for shard in client.list_shards(StreamName="shapes")["Shards"]:
            it = client.get_shard_iterator(
                StreamName="shapes", ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )
            total += len(client.get_records(ShardIterator=it["ShardIterator"], Limit=10000)["Records"])
        assert total == len(records)
