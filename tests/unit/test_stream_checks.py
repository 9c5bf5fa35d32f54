"""The sink's readiness before any message arrives, and the client each stream is sent with.

Stream checks (DescribeStreamSummary) run on the sink's own job path, so a fake clock drives them
and their re-checks; a scripted client answers per stream. No network, no sleeps.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from gateway.model import PUT, Record
from gateway.settings.settings import SinkConfig
from gateway.sink.clients import RegionalClients, region_of
from gateway.sink.health import NOT_CHECKED
from gateway.sink.kinesis import KinesisSink

ARN_MUMBAI = "arn:aws:kinesis:ap-south-1:123456789012:stream/telemetry"
ARN_VIRGINIA = "arn:aws:kinesis:us-east-1:123456789012:stream/telemetry"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MaxRng:
    def uniform(self, a: float, b: float) -> float:
        return b


def client_error(code: str, operation: str = "DescribeStreamSummary") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} (scripted)"},
                        "ResponseMetadata": {"HTTPStatusCode": 400}}, operation)


class Meta:
    endpoint_url = "http://127.0.0.1:4599"


class ScriptedKinesis:
    """Streams it knows answer ACTIVE (or their scripted status); others, ResourceNotFound.
    ``down`` makes every call fail as a closed port does."""

    meta = Meta()

    def __init__(self, *streams: str, name: str = "") -> None:
        self.name = name
        self.status = {stream: "ACTIVE" for stream in streams}
        self.down = False
        self.denied = False
        self.described: list[str] = []
        self.requests: list[dict[str, Any]] = []

    def _stream(self, kwargs: dict[str, Any]) -> str:
        return str(kwargs.get("StreamName") or kwargs.get("StreamARN"))

    def describe_stream_summary(self, **kwargs: Any) -> dict[str, Any]:
        stream = self._stream(kwargs)
        self.described.append(stream)
        if self.down:
            raise EndpointConnectionError(endpoint_url=self.meta.endpoint_url)
        if self.denied:
            raise client_error("AccessDeniedException")
        if stream not in self.status:
            raise client_error("ResourceNotFoundException")
        return {"StreamDescriptionSummary": {"StreamName": stream, "StreamStatus": self.status[stream]}}

    def put_records(self, **kwargs: Any) -> dict[str, Any]:
        stream = self._stream(kwargs)
        self.requests.append(kwargs)
        if self.down:
            raise EndpointConnectionError(endpoint_url=self.meta.endpoint_url)
        if stream not in self.status:
            raise client_error("ResourceNotFoundException", "PutRecords")
        return {"FailedRecordCount": 0, "Records": [{"SequenceNumber": "1", "ShardId": "shardId-0"}
                                                    for _ in kwargs["Records"]]}

    def list_shards(self, **kwargs: Any) -> dict[str, Any]:
        return {"Shards": []}


class Harness:
    def __init__(self, clients: RegionalClients, **config: Any) -> None:
        self.clock = FakeClock()
        self.settled: list[tuple[Any, Any]] = []
        self.sink: KinesisSink[int] = KinesisSink(clients, SinkConfig(linger_s=0.0, **config), self.settled.extend,
                                                  clock=self.clock, rng=MaxRng())

    def after(self, seconds: float) -> int:
        self.clock.now += seconds
        return self.sink.step()


def harness(client: ScriptedKinesis, **config: Any) -> Harness:
    return Harness(RegionalClients.sharing(client), **config)


# ---- readiness before the first message ---------------------------------------------------


def test_streams_are_not_ready_until_checked_and_a_missing_one_is_named_with_its_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = ScriptedKinesis("present")
    h = harness(client)
    h.sink.check_streams(["present", "missing"])
    assert h.sink.stream_problems() == {"present": NOT_CHECKED, "missing": NOT_CHECKED}
    assert not h.sink.healthy
    with caplog.at_level(logging.INFO, logger="gateway.sink"):
        h.sink.step()
    assert sorted(client.described) == ["missing", "present"]
    problems = h.sink.stream_problems()
    assert list(problems) == ["missing"] and problems["missing"].startswith("ResourceNotFoundException: ")
    assert not h.sink.healthy and h.sink.last_error == f"stream missing: {problems['missing']}"
    (line,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    message = line.getMessage()
    assert "missing" in message and "http://127.0.0.1:4599" in message and "ResourceNotFoundException" in message
    assert "\n" not in message and line.exc_info is None


def test_a_closed_endpoint_makes_every_stream_not_ready() -> None:
    client = ScriptedKinesis("a", "b")
    client.down = True
    h = harness(client)
    h.sink.check_streams(["a", "b"])
    h.sink.step()
    problems = h.sink.stream_problems()
    assert set(problems) == {"a", "b"}
    assert all(p.startswith("EndpointConnectionError: ") for p in problems.values())


def test_a_failing_stream_is_checked_again_with_backoff_and_turns_ready_once_created(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = ScriptedKinesis()
    h = harness(client)
    h.sink.check_streams(["late"])
    with caplog.at_level(logging.INFO, logger="gateway.sink"):
        h.sink.step()
        checks_at = []
        for _ in range(75):
            h.after(1.0)
            if len(client.described) > len(checks_at) + 1:
                checks_at.append(h.clock.now - 1000.0)
        assert checks_at == [10.0, 30.0, 70.0]  # 10 s, then doubling, up to 60 s
        assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1  # logged once
        client.status["late"] = "ACTIVE"
        h.after(60.0)
    assert h.sink.stream_problems() == {} and h.sink.healthy
    assert any("check succeeds again" in r.getMessage() for r in caplog.records)
    calls = len(client.described)
    h.after(600.0)
    assert len(client.described) == calls  # a stream that works is not checked again


def test_a_stream_still_being_created_is_not_ready() -> None:
    client = ScriptedKinesis("new")
    client.status["new"] = "CREATING"
    h = harness(client)
    h.sink.check_streams(["new"])
    h.sink.step()
    assert h.sink.stream_problems() == {"new": "stream is CREATING"}
    client.status["new"] = "ACTIVE"
    h.after(10.0)
    assert h.sink.healthy


def test_without_permission_to_describe_the_requests_decide(caplog: pytest.LogCaptureFixture) -> None:
    client = ScriptedKinesis("s")
    client.denied = True
    h = harness(client)
    h.sink.check_streams(["s"])
    with caplog.at_level(logging.INFO, logger="gateway.sink"):
        h.sink.step()
    assert h.sink.healthy
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "kinesis:DescribeStreamSummary" in warning.getMessage()
    h.after(600.0)
    assert client.described == ["s"]


def test_a_reload_checks_the_new_table_and_forgets_streams_it_dropped() -> None:
    client = ScriptedKinesis("kept")
    h = harness(client)
    h.sink.check_streams(["kept", "dropped"])
    h.sink.step()
    assert set(h.sink.stream_problems()) == {"dropped"}
    h.sink.check_streams(["kept", "added"])
    assert h.sink.stream_problems() == {"added": NOT_CHECKED}  # "kept" stays ready meanwhile
    h.sink.step()
    assert sorted(client.described) == ["added", "dropped", "kept", "kept"]
    assert set(h.sink.stream_problems()) == {"added"}


def test_a_successful_request_answers_a_failing_check() -> None:
    client = ScriptedKinesis("s")
    client.denied = False
    h = harness(client)
    client.status.pop("s")
    h.sink.check_streams(["s"])
    h.sink.step()
    assert set(h.sink.stream_problems()) == {"s"}
    client.status["s"] = "ACTIVE"
    h.sink.put([(Record("r", "s", "k", b"x"), 1)])
    h.sink.step()
    assert h.settled == [(1, PUT)] and h.sink.healthy
    calls = len(client.described)
    h.after(600.0)
    assert len(client.described) == calls


def test_held_records_go_as_soon_as_a_check_finds_the_stream() -> None:
    client = ScriptedKinesis()
    h = harness(client, backoff_cap_s=60.0)
    h.sink.check_streams(["s"])
    h.sink.put([(Record("r", "s", "k", b"x"), 1)])
    h.sink.step()                              # check fails, PutRecords fails: held for 60 s
    assert h.settled == [] and len(client.requests) == 1
    client.status["s"] = "ACTIVE"
    h.after(10.0)                              # the re-check finds it; the pause ends
    assert h.settled == [(1, PUT)] and len(client.requests) == 2


# ---- one client per region ----------------------------------------------------------------


@pytest.mark.parametrize(("stream", "region"), [
    (ARN_MUMBAI, "ap-south-1"),
    ("arn:aws-cn:kinesis:cn-north-1:123456789012:stream/s", "cn-north-1"),
    ("telemetry", None),
    ("arn:aws:kinesis", None),
])
def test_the_region_of_a_stream_is_its_arns(stream: str, region: str | None) -> None:
    assert region_of(stream) == region


def test_one_client_per_region_made_when_the_routes_are_loaded() -> None:
    made: list[str | None] = []

    def make(region: str | None) -> ScriptedKinesis:
        made.append(region)
        return ScriptedKinesis(name=str(region))

    clients = RegionalClients(make, default_region="us-east-1")
    clients.prepare(["plain", ARN_VIRGINIA, ARN_MUMBAI, "other"])
    assert made == ["us-east-1", "ap-south-1"]
    assert clients.for_stream("plain") is clients.for_stream(ARN_VIRGINIA)
    assert clients.for_stream(ARN_MUMBAI) is not clients.for_stream("plain")
    assert made == ["us-east-1", "ap-south-1"]


def test_a_stream_arn_in_another_region_is_checked_and_sent_with_that_regions_client() -> None:
    virginia, mumbai = ScriptedKinesis("plain"), ScriptedKinesis(ARN_MUMBAI)
    clients = RegionalClients({"us-east-1": virginia, "ap-south-1": mumbai}.__getitem__, default_region="us-east-1")
    h = Harness(clients)
    h.sink.check_streams(["plain", ARN_MUMBAI])
    h.sink.put([(Record("r", ARN_MUMBAI, "k", b"x"), 1), (Record("r", "plain", "k", b"y"), 2)])
    h.sink.step()
    assert h.sink.healthy and sorted(h.settled) == [(1, PUT), (2, PUT)]
    assert (virginia.described, mumbai.described) == (["plain"], [ARN_MUMBAI])
    assert [r.get("StreamARN") for r in mumbai.requests] == [ARN_MUMBAI]
    assert [r.get("StreamName") for r in virginia.requests] == ["plain"]
