"""KPL aggregation checked against the awslabs deaggregator and a 4-shard stream in moto."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from aws_kinesis_agg.deaggregator import deaggregate_records
from hypothesis import given, settings
from hypothesis import strategies as st
from moto import mock_aws

from gateway.model import PUT, Record
from gateway.settings.settings import SinkConfig
from gateway.sink.batching import Entry
from gateway.sink.clients import RegionalClients
from gateway.sink.kinesis import KinesisSink
from gateway.sink.kpl import MAGIC, aggregate, encode_aggregate, hash_key
from gateway.sink.shards import ShardMap, load_shard_map

STREAM = "agg"


def user(pk: str, data: bytes, ehk: str | None = None, token: Any = None) -> Entry:
    return Entry(pk, data, ehk, len(data) + len(pk.encode()), "r", token, 0.0)


def deaggregate(entry: Entry) -> list[tuple[str, bytes, str | None]]:
    """Run one Kinesis record through the awslabs deaggregator, as a Lambda consumer would."""
    lambda_record = {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "sequenceNumber": "1",
            "approximateArrivalTimestamp": 0,
            "partitionKey": entry.pk,
            "explicitHashKey": entry.ehk,
            "data": base64.b64encode(entry.data),
        }
    }
    out = deaggregate_records([lambda_record])
    return [
        (k["partitionKey"], base64.b64decode(k["data"]), k.get("explicitHashKey"))
        for k in (r["kinesis"] for r in out)
    ]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KINESIS", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("kinesis", region_name="us-east-1")
        client.create_stream(StreamName=STREAM, ShardCount=4)
        yield client


def test_aggregate_is_magic_protobuf_and_md5_of_the_protobuf() -> None:
    blob = encode_aggregate(["a", "b"], ["42"], [(0, None, b"one"), (1, 0, b"two")])
    body = blob[len(MAGIC) : -16]
    assert blob.startswith(bytes.fromhex("f3899ac2"))
    assert blob[-16:] == hashlib.md5(body).digest()


keys = st.text(min_size=1, max_size=20)  # hypothesis text never holds lone surrogates
user_records = st.lists(
    st.tuples(keys, st.binary(max_size=300), st.one_of(st.none(), st.integers(0, 2**128 - 1).map(str))),
    min_size=1,
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(records=user_records, limit=st.sampled_from([400, 2000, 51200]))
def test_every_user_record_round_trips_through_the_deaggregator(records: list, limit: int) -> None:
    entries = [user(pk, data, ehk, token=i) for i, (pk, data, ehk) in enumerate(records)]
    shard_map = ShardMap((0, 2**126, 2**127), (2**126 - 1, 2**127 - 1, 2**128 - 1), ("s0", "s1", "s2"))
    out = aggregate(entries, shard_map, limit)
    seen: list[tuple[str, bytes]] = []
    tokens: list[Any] = []
    for entry in out:
        assert entry.size == len(entry.data) + len(entry.pk.encode())
        assert entry.size <= max(limit, max(e.size for e in entries))
        unpacked = deaggregate(entry)
        seen += [(pk, data) for pk, data, _ in unpacked]
        tokens += [entry.token] if entry.members is None else [t for _, t in entry.members]
        if entry.members is not None:
            assert entry.size <= limit
            assert len(unpacked) == len(entry.members) >= 2
            member_tokens = {t for _, t in entry.members}
            members = [e for e in entries if e.token in member_tokens]
            shards = {shard_map.shard_for(int(e.ehk) if e.ehk else hash_key(e.pk)) for e in members}
            assert shards == {shard_map.shard_for(int(entry.ehk))} == {entry.shard}
    assert sorted(seen) == sorted((pk, data) for pk, data, _ in records)
    assert sorted(tokens) == list(range(len(records)))


def test_explicit_hash_keys_of_user_records_survive() -> None:
    entries = [user("a", b"1", ehk="7"), user("b", b"2", ehk="7"), user("c", b"3", ehk="7")]
    out = aggregate(entries, None, 51200)
    assert len(out) == 1
    assert deaggregate(out[0]) == [("a", b"1", "7"), ("b", b"2", "7"), ("c", b"3", "7")]
    assert out[0].ehk == "7"


def test_without_a_shard_map_only_records_with_the_same_hash_key_share_an_aggregate() -> None:
    entries = [user(k, b"x") for k in ("a", "b", "a", "c", "a")]
    out = aggregate(entries, None, 51200)
    assert sorted((e.pk, e.count) for e in out) == [("a", 3), ("b", 1), ("c", 1)]
    assert all(e.members is None for e in out if e.count == 1)  # an aggregate of one is sent plain


def test_record_too_large_to_share_an_aggregate_is_sent_plain() -> None:
    big = user("a", b"x" * 1000, token="big")
    out = aggregate([user("a", b"1"), big, user("a", b"2")], None, 500)
    assert big in out and sum(e.count for e in out) == 3


def test_shard_map_reads_open_shards_across_pages() -> None:
    pages = [
        {"Shards": [shard("s-1", 100, 199), shard("s-0", 0, 99, closed=True)], "NextToken": "t"},
        {"Shards": [shard("s-2", 0, 99)]},
    ]
    calls: list[dict[str, Any]] = []

    class Client:
        def list_shards(self, **kwargs: Any) -> dict[str, Any]:
            calls.append(kwargs)
            return pages[len(calls) - 1]

    shard_map = load_shard_map(Client(), "arn:aws:kinesis:us-east-1:1:stream/x")
    assert calls == [{"StreamARN": "arn:aws:kinesis:us-east-1:1:stream/x"}, {"NextToken": "t"}]
    assert shard_map.ids == ("s-2", "s-1")
    assert shard_map.shard_for(150) == "s-1" and shard_map.shard_for(200) is None


def shard(shard_id: str, start: int, end: int, closed: bool = False) -> dict[str, Any]:
    numbers = {"StartingSequenceNumber": "1"} | ({"EndingSequenceNumber": "2"} if closed else {})
    return {
        "ShardId": shard_id,
        "HashKeyRange": {"StartingHashKey": str(start), "EndingHashKey": str(end)},
        "SequenceNumberRange": numbers,
    }


def test_aggregate_hash_key_lies_in_the_shard_of_all_its_members(aws: Any) -> None:
    shard_map = load_shard_map(aws, STREAM)
    assert len(shard_map.ids) == 4
    entries = [user(f"device-{i}", b"%d" % i, token=i) for i in range(400)]
    out = aggregate(entries, shard_map, 51200)
    assert len(out) == 4
    for entry in out:
        members = deaggregate(entry)
        member_shards = {shard_map.shard_for(hash_key(pk)) for pk, _, _ in members}
        assert member_shards == {shard_map.shard_for(int(entry.ehk))}


def test_sink_aggregates_marked_routes_per_shard_and_settles_every_member(aws: Any) -> None:
    settled: list[tuple[Any, Any]] = []
    sink = KinesisSink(RegionalClients.sharing(aws), SinkConfig(), settled.extend, aggregate_routes={"agg"})
    records = [Record("agg", STREAM, f"device-{i}", b"reading-%d" % i) for i in range(300)]
    records += [Record("plain", STREAM, f"p{i}", b"plain-%d" % i) for i in range(5)]
    sink.put([(r, i) for i, r in enumerate(records)])
    assert sink.drain(30.0)
    assert sorted(t for t, s in settled if s == PUT) == list(range(len(records)))

    shard_map = load_shard_map(aws, STREAM)
    kinesis_records = 0
    found: list[tuple[str, bytes]] = []
    for shard_id, start, end in zip(shard_map.ids, shard_map.starts, shard_map.ends):
        iterator = aws.get_shard_iterator(
            StreamName=STREAM, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
        )
        got = aws.get_records(ShardIterator=iterator["ShardIterator"], Limit=10000)["Records"]
        kinesis_records += len(got)
        for r in got:
            entry = Entry(r["PartitionKey"], r["Data"], None, 0, "", None, 0.0)
            for pk, data, _ in deaggregate(entry):
                assert start <= hash_key(pk) <= end, "a user record was stored outside its shard"
                found.append((pk, data))
    assert sorted(found) == sorted((r.partition_key, r.data) for r in records)
    assert kinesis_records == 4 + 5  # one aggregate per shard, plain records unaggregated


class ScriptedShards:
    """A client whose shard map changes (a reshard) between two requests."""

    def __init__(self) -> None:
        self.list_calls = 0
        self.requests: list[dict[str, Any]] = []

    def list_shards(self, **kwargs: Any) -> dict[str, Any]:
        self.list_calls += 1
        return {"Shards": [shard("shardId-1", 0, 2**128 - 1)]}

    def put_records(self, **request: Any) -> dict[str, Any]:
        self.requests.append(request)
        landed = [{"ShardId": "shardId-9", "SequenceNumber": "1"} for _ in request["Records"]]
        return {"FailedRecordCount": 0, "Records": landed}


def test_aggregate_landing_on_an_unexpected_shard_refreshes_the_map() -> None:
    client = ScriptedShards()
    sink = KinesisSink(RegionalClients.sharing(client), SinkConfig(), lambda _: None, aggregate_routes={"agg"})
    sink.put([(Record("agg", "s", f"k{i}", b"x"), i) for i in range(10)])
    assert sink.drain(5.0)
    sink.put([(Record("agg", "s", f"k{i}", b"y"), i) for i in range(10)])
    assert sink.drain(5.0)
    assert client.list_calls == 2
    assert len(client.requests) == 2 and all(len(r["Records"]) == 1 for r in client.requests)


def test_denied_list_shards_falls_back_to_per_key_aggregates() -> None:
    from botocore.exceptions import ClientError

    class Denied(ScriptedShards):
        def list_shards(self, **kwargs: Any) -> dict[str, Any]:
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "ListShards")

    client = Denied()
    settled: list[tuple[Any, Any]] = []
    sink = KinesisSink(RegionalClients.sharing(client), SinkConfig(), settled.extend)
    sink.set_aggregate_routes({"agg"})  # as on a reload that turns aggregation on
    sink.put([(Record("agg", "s", k, b"x"), i) for i, k in enumerate("aabba")])
    assert sink.drain(5.0)
    assert sorted(t for t, s in settled if s == PUT) == [0, 1, 2, 3, 4]
    assert sorted(r["PartitionKey"] for r in client.requests[0]["Records"]) == ["a", "b"]
