"""The shared Kinesis client: pinned retries, endpoint from boto3's env, refreshable assumed role."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from botocore.credentials import DeferredRefreshableCredentials
from botocore.validate import ParamValidationDecorator
from moto import mock_aws

from gateway.sink.aws import make_kinesis_client
from gateway.sink.clients import RegionalClients

ROLE = "arn:aws:iam::123456789012:role/gateway"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KINESIS", "AWS_PROFILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    yield


def test_client_pins_standard_retries_and_skips_parameter_validation(aws_env: None) -> None:
    client = make_kinesis_client("eu-west-1", max_pool_connections=8)
    config = client.meta.config
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    # meta.config does not echo parameter_validation; the serializer shows whether it is on.
    assert not isinstance(client._serializer, ParamValidationDecorator)
    assert config.tcp_keepalive is True
    assert (config.connect_timeout, config.read_timeout) == (5.0, 10.0)
    assert config.max_pool_connections == 8
    assert client.meta.region_name == "eu-west-1"


def test_endpoint_comes_from_boto3_service_env(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KINESIS", "http://127.0.0.1:4567")
    assert make_kinesis_client("us-east-1").meta.endpoint_url == "http://127.0.0.1:4567"


def test_assumed_role_uses_refreshable_credentials_and_works(aws_env: None) -> None:
    with mock_aws():
        client = make_kinesis_client("us-east-1", assume_role_arn=ROLE, session_name="edge-7")
        credentials = client._request_signer._credentials
        assert isinstance(credentials, DeferredRefreshableCredentials)
        assert credentials.method == "assume-role"
        client.create_stream(StreamName="s", ShardCount=1)
        assert credentials.access_key != "testing"  # the role's keys, not the source keys
        assert client.list_streams()["StreamNames"] == ["s"]


def test_a_stream_arn_gets_a_client_of_its_own_region(aws_env: None) -> None:
    clients = RegionalClients(lambda region: make_kinesis_client(region), default_region="us-east-1")
    mumbai = clients.for_stream("arn:aws:kinesis:ap-south-1:123456789012:stream/telemetry")
    assert mumbai.meta.region_name == "ap-south-1"
    assert clients.for_stream("telemetry").meta.region_name == "us-east-1"
