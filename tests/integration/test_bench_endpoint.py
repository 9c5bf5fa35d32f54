"""The bench's Kinesis endpoint speaks enough of Kinesis for boto3, and gives back what it was given.

If it answered botocore wrongly, every gateway figure in the benchmark would measure retries or
errors instead of delivery; if its read-back lost or reordered records, loss and duplicate counts
would be wrong. No timing here: speed is the benchmark's business.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.config
import orjson
import pytest
from botocore.exceptions import ClientError

from bench.readback import analyse
from bench.services import Endpoint

pytestmark = pytest.mark.integration


@pytest.fixture()
def endpoint(tmp_path: Path) -> Iterator[Endpoint]:
    ep = Endpoint(["bench-stream"], tmp_path).start()
    try:
        yield ep
    finally:
        ep.stop()


@pytest.fixture()
def kinesis(endpoint: Endpoint):  # type: ignore[no-untyped-def]
    return boto3.client("kinesis", endpoint_url=endpoint.url, region_name="us-east-1",
                        aws_access_key_id="x", aws_secret_access_key="x",
                        config=botocore.config.Config(retries={"max_attempts": 1}))


def _welder(seq: int) -> bytes:
    return orjson.dumps({"name": "device123", "model": "welder", "seq": seq, "t": 1}) + b"\n"


def test_put_records_are_acknowledged_in_order_and_read_back_intact(kinesis, endpoint: Endpoint) -> None:
    sent = [_welder(i) for i in range(500)]
    resp = kinesis.put_records(StreamName="bench-stream",
                               Records=[{"Data": d, "PartitionKey": "device123"} for d in sent])
    assert resp["FailedRecordCount"] == 0
    seqs = [int(r["SequenceNumber"]) for r in resp["Records"]]
    assert seqs == sorted(seqs) and len(set(seqs)) == 500
    assert all(r["ShardId"] == "shardId-000000000000" for r in resp["Records"])

    held = endpoint.records("bench-stream")
    assert [base64.b64decode(r[2]) for r in held] == sent
    assert {r[1] for r in held} == {"device123"}
    delivery = analyse(held, expected=500)
    assert (delivery.unique, delivery.lost, delivery.duplicates) == (500, 0, 0)


def test_list_shards_and_describe_answer_for_created_streams(kinesis) -> None:
    kinesis.create_stream(StreamName="four", ShardCount=4)
    shards = kinesis.list_shards(StreamName="four")["Shards"]
    assert [s["ShardId"] for s in shards] == [f"shardId-{i:012d}" for i in range(4)]
    assert shards[0]["HashKeyRange"]["StartingHashKey"] == "0"
    assert shards[-1]["HashKeyRange"]["EndingHashKey"] == str(2**128 - 1)
    summary = kinesis.describe_stream_summary(StreamName="four")["StreamDescriptionSummary"]
    assert (summary["StreamStatus"], summary["OpenShardCount"]) == ("ACTIVE", 4)


def test_put_record_by_arn_lands_in_the_named_stream(kinesis, endpoint: Endpoint) -> None:
    arn = "arn:aws:kinesis:us-east-1:000000000000:stream/bench-stream"
    kinesis.put_record(StreamARN=arn, Data=b"one", PartitionKey="k")
    assert [base64.b64decode(r[2]) for r in endpoint.records("bench-stream")] == [b"one"]


def test_unknown_stream_is_resource_not_found(kinesis) -> None:
    with pytest.raises(ClientError) as err:
        kinesis.put_records(StreamName="missing", Records=[{"Data": b"x", "PartitionKey": "k"}])
    assert err.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_get_records_reads_what_put_records_wrote(kinesis) -> None:
    kinesis.put_records(StreamName="bench-stream", Records=[{"Data": b"r%d" % i, "PartitionKey": "k"}
                                                            for i in range(3)])
    it = kinesis.get_shard_iterator(StreamName="bench-stream", ShardId="shardId-000000000000",
                                    ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    got = kinesis.get_records(ShardIterator=it)["Records"]
    assert [r["Data"] for r in got] == [b"r0", b"r1", b"r2"]


def test_reset_forgets_records_but_keeps_streams(kinesis, endpoint: Endpoint) -> None:
    kinesis.put_record(StreamName="bench-stream", Data=b"x", PartitionKey="k")
    endpoint.reset()
    assert endpoint.count("bench-stream") == 0
    kinesis.put_record(StreamName="bench-stream", Data=b"y", PartitionKey="k")
    assert endpoint.count("bench-stream") == 1


def test_kpl_aggregates_are_unpacked_on_read_back(kinesis, endpoint: Endpoint) -> None:
    agg = pytest.importorskip("aws_kinesis_agg.aggregator")
    aggregator = agg.RecordAggregator()
    for i in range(3):
        aggregator.add_user_record("device123", _welder(i))
    pk, _ehk, data = aggregator.clear_and_get().get_contents()
    kinesis.put_records(StreamName="bench-stream", Records=[{"Data": data, "PartitionKey": pk}])
    delivery = analyse(endpoint.records("bench-stream"), expected=3)
    assert (delivery.kinesis_records, delivery.user_records, delivery.lost) == (1, 3, 0)


def test_cbor_requests_are_refused_with_a_clear_error(endpoint: Endpoint) -> None:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(endpoint.url, data=b"\xa0", method="POST", headers={
        "X-Amz-Target": "Kinesis_20131202.PutRecords", "Content-Type": "application/x-amz-cbor-1.1"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    body = orjson.loads(err.value.read())
    assert body["__type"] == "SerializationException" and "CBOR" in body["message"]


def test_a_throttled_stream_fails_entries_beyond_a_shards_limit_with_http_200(endpoint: Endpoint, kinesis) -> None:
    """Over real HTTP and botocore: the partial failure is an HTTP 200 botocore hands back as data."""
    kinesis.create_stream(StreamName="limited", ShardCount=2)
    endpoint.set_throttle("limited")
    recs = [{"Data": _welder(i), "PartitionKey": f"device{i}"} for i in range(500)]
    failed = sum(kinesis.put_records(StreamName="limited", Records=recs)["FailedRecordCount"] for _ in range(6))
    codes = {r.get("ErrorCode") for r in kinesis.put_records(StreamName="limited", Records=recs)["Records"]}
    stats = endpoint.throttle_stats("limited")
    assert stats["shards"] == 2 and stats["sent"] == 3500
    assert stats["accepted"] + stats["throttled"] == 3500
    assert stats["accepted"] == endpoint.count("limited")
    assert failed > 0 and "ProvisionedThroughputExceededException" in codes
    # two shards hold 2,000 records of allowance; the short run refills a little more, never 3,500
    assert 2000 <= stats["accepted"] < 3500
    endpoint.set_throttle("limited", on=False)
    assert kinesis.put_records(StreamName="limited", Records=recs)["FailedRecordCount"] == 0
