"""The sink's readiness against real endpoints, before any message is sent.

A closed port and a stream that does not exist must show as not ready within seconds of start,
named with their error, with nothing published; a stream that exists must turn ready, also when
it is named by an ARN of another region than AWS_REGION. The sink runs its own worker threads
with the gateway's real client factory, pointed at moto's server (or at a closed port) through
AWS_ENDPOINT_URL_KINESIS, as the process is.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.settings.settings import SinkConfig
from gateway.sink.aws import make_kinesis_client
from gateway.sink.clients import RegionalClients
from gateway.sink.health import NOT_CHECKED
from gateway.sink.kinesis import KinesisSink
from tests.support.services import MotoServer, create_stream, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WITHIN_S = 5.0


@pytest.fixture
def start_sink(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, list[str]], KinesisSink[Any]]]:
    """start_sink(endpoint_url, streams) -> a started sink checking `streams`, region us-east-1."""
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    sinks: list[KinesisSink[Any]] = []

    def start(endpoint_url: str, streams: list[str]) -> KinesisSink[Any]:
        monkeypatch.setenv("AWS_ENDPOINT_URL_KINESIS", endpoint_url)
        clients = RegionalClients(lambda region: make_kinesis_client(region), default_region="us-east-1")
        sink: KinesisSink[Any] = KinesisSink(clients, SinkConfig(), lambda _results: None)
        sinks.append(sink)
        sink.check_streams(streams)
        sink.start()
        return sink

    yield start
    for sink in sinks:
        sink.close()


def watch(sink: KinesisSink[Any], done: Callable[[dict[str, str]], bool]) -> tuple[list[bool], dict[str, str]]:
    """Poll readiness for up to WITHIN_S seconds, until `done(problems)`; every answer seen, and the last."""
    seen: list[bool] = []
    end = time.monotonic() + WITHIN_S
    while True:
        problems = sink.stream_problems()
        seen.append(sink.healthy)
        if done(problems) or time.monotonic() >= end:
            return seen, problems
        time.sleep(0.05)


def checked(problems: dict[str, str]) -> bool:
    return NOT_CHECKED not in problems.values()


def test_a_closed_endpoint_is_not_ready_and_names_the_connection_error(start_sink: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    sink = start_sink(url, ["telemetry"])
    seen, problems = watch(sink, checked)
    assert not any(seen)
    assert problems["telemetry"].startswith("EndpointConnectionError: ") and url in problems["telemetry"]


def test_a_missing_stream_is_not_ready_while_an_existing_one_is(
    start_sink: Any, kinesis_endpoint: MotoServer, make_stream: Callable[..., str]
) -> None:
    present, missing = make_stream(), f"missing-{uuid.uuid4().hex[:8]}"
    sink = start_sink(kinesis_endpoint.url, [present, missing])
    seen, problems = watch(sink, lambda p: checked(p) and present not in p)
    assert not any(seen)
    assert list(problems) == [missing]
    assert problems[missing].startswith("ResourceNotFoundException: ")


def test_a_stream_arn_of_another_region_is_checked_in_its_region(
    start_sink: Any, kinesis_endpoint: MotoServer
) -> None:
    name = f"mumbai-{uuid.uuid4().hex[:8]}"
    arn = create_stream(_client_in(kinesis_endpoint.url, "ap-south-1"), name)  # moto keeps streams per region
    assert ":ap-south-1:" in arn
    sink = start_sink(kinesis_endpoint.url, [arn])
    seen, problems = watch(sink, lambda p: not p)
    assert problems == {} and seen[-1]


def _client_in(url: str, region: str) -> Any:
    import boto3

    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name=region).client("kinesis", endpoint_url=url)
