"""The bench endpoint's Kinesis throttle: per shard, 1,000 records/s and 1 MiB/s, entry by entry.

The spool's drain is judged against this endpoint (tests/fault/test_spool_throttled_drain.py): if
it let more through than a shard takes, a storm of requests would look like good pacing; if it
refused whole requests, the gateway's per-entry retry would never be exercised. The clock is
injected, so no test here depends on how fast it runs.
"""

from __future__ import annotations

import base64

import orjson

from bench.endpoint import SHARD_BYTES_PER_S, SHARD_RECORDS_PER_S, THROTTLED, Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(shards: int = 1) -> tuple[Store, Clock]:
    clock = Clock()
    store = Store(throttle=True, clock=clock)
    store.add("s", shards)
    return store, clock


def _put(store: Store, n: int, *, key: str = "k", data: bytes = b"x", ehk: str | None = None) -> dict:
    recs = [{"PartitionKey": key, "Data": base64.b64encode(data).decode(),
             **({"ExplicitHashKey": ehk} if ehk else {})} for _ in range(n)]
    return orjson.loads(store.call("Kinesis_20131202.PutRecords",
                                   orjson.dumps({"StreamName": "s", "Records": recs})))


def test_a_shard_takes_a_seconds_worth_of_records_then_refuses_entries_not_the_request() -> None:
    store, _ = _store()
    first = _put(store, 500)
    second = _put(store, 500)
    third = _put(store, 500)
    assert first["FailedRecordCount"] == second["FailedRecordCount"] == 0
    assert third["FailedRecordCount"] == 500
    assert {r["ErrorCode"] for r in third["Records"]} == {THROTTLED}
    assert "Rate exceeded for shard shardId-000000000000 in stream s" in third["Records"][0]["ErrorMessage"]
    assert len(store.streams["s"].records) == SHARD_RECORDS_PER_S
    assert orjson.loads(store.stats())["throttle"]["s"] | {"first_accept_ns": 0, "last_accept_ns": 0} == {
        "shards": 1, "sent": 1500, "accepted": 1000, "throttled": 500, "first_accept_ns": 0, "last_accept_ns": 0}


def test_the_allowance_refills_at_the_shard_rate() -> None:
    store, clock = _store()
    _put(store, 500)
    _put(store, 500)
    clock.now += 0.25
    assert _put(store, 500)["FailedRecordCount"] == 250
    clock.now += 10  # a long pause refills one second's worth, no more
    assert _put(store, 500)["FailedRecordCount"] == 0
    assert _put(store, 500)["FailedRecordCount"] == 0
    assert _put(store, 1)["FailedRecordCount"] == 1


def test_a_partial_failure_keeps_the_order_of_the_entries() -> None:
    store, clock = _store()
    _put(store, 500)
    _put(store, 499)
    out = _put(store, 3)
    assert out["FailedRecordCount"] == 2
    assert "SequenceNumber" in out["Records"][0]
    assert [r.get("ErrorCode") for r in out["Records"][1:]] == [THROTTLED, THROTTLED]


def test_bytes_are_limited_to_one_mebibyte_per_second_per_shard() -> None:
    store, _ = _store()
    data = b"z" * (256 * 1024 - 1)  # + 1-byte key: exactly a quarter MiB per entry
    out = _put(store, 5, data=data)
    assert out["FailedRecordCount"] == 1
    assert sum(len(base64.b64decode(r[2])) + 1 for r in store.streams["s"].records) == SHARD_BYTES_PER_S


def test_each_shard_has_its_own_allowance() -> None:
    store, _ = _store(shards=2)
    low, high = "0", str(2**127)  # explicit hash keys in shard 0 and shard 1
    assert _put(store, 500, ehk=low)["FailedRecordCount"] == 0
    assert _put(store, 500, ehk=low)["FailedRecordCount"] == 0
    assert _put(store, 500, ehk=low)["FailedRecordCount"] == 500
    assert _put(store, 500, ehk=high)["FailedRecordCount"] == 0
    assert _put(store, 500, ehk=high)["FailedRecordCount"] == 0
    stats = orjson.loads(store.stats())["throttle"]["s"]
    assert (stats["shards"], stats["sent"], stats["accepted"], stats["throttled"]) == (2, 2500, 2000, 500)


def test_put_record_beyond_the_limit_is_a_throttling_error() -> None:
    store, _ = _store()
    _put(store, 500)
    _put(store, 500)
    body = orjson.dumps({"StreamName": "s", "PartitionKey": "k", "Data": "eA=="})
    try:
        store.call("Kinesis_20131202.PutRecord", body)
    except Exception as exc:  # noqa: BLE001 - the ApiError the HTTP layer turns into a 400
        assert getattr(exc, "kind", None) == THROTTLED
    else:
        raise AssertionError("PutRecord beyond the shard's limit was accepted")


def test_streams_are_unthrottled_unless_asked_and_reset_refills() -> None:
    plain = Store()
    plain.add("s")
    recs = [{"PartitionKey": "k", "Data": "eA=="}] * 500
    for _ in range(4):
        out = orjson.loads(plain.call("Kinesis_20131202.PutRecords", orjson.dumps({"StreamName": "s", "Records": recs})))
        assert out["FailedRecordCount"] == 0
    assert "s" not in orjson.loads(plain.stats())["throttle"]
    store, _ = _store()
    _put(store, 500)
    _put(store, 500)
    store.reset()
    assert _put(store, 500)["FailedRecordCount"] == 0
    assert orjson.loads(store.stats())["throttle"]["s"]["sent"] == 500
