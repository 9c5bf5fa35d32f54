"""The lean Kinesis client: botocore's signature, Kinesis' answers and errors as the sink reads them."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from gateway.sink.credentials import ADVISORY_S, MANDATORY_S, CredentialSource
from gateway.sink.errors import CredentialRetrievalError, ReadTimeoutError, ServiceError
from gateway.sink.lean import LeanKinesisClient, make_lean_client
from gateway.sink.retry import Action, classify
from gateway.sink.sigv4 import Credentials, sign

NOW = 1_764_000_000.0  # a fixed clock: 2025-11-24T16:00:00Z


def botocore_authorization(url: str, headers: dict[str, str], body: bytes, token: str | None) -> str:
    request = AWSRequest("POST", url, data=body, headers=headers)
    auth = SigV4Auth(BotoCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), "kinesis", "eu-west-1")
    import datetime
    from unittest import mock

    fixed = datetime.datetime.fromtimestamp(NOW, datetime.UTC).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=fixed):
        auth.add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize("token", [None, "session-token/+="])
@pytest.mark.parametrize("host", ["kinesis.eu-west-1.amazonaws.com", "127.0.0.1:4567"])
def test_signature_is_botocores_for_the_same_clock_credentials_and_headers(token: str | None, host: str) -> None:
    body = orjson.dumps({"StreamName": "s", "Records": [{"Data": "aGk=", "PartitionKey": "k"}]})
    headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "Kinesis_20131202.PutRecords",
               "User-Agent": "mqtt-kinesis-gateway/test"}
    ours = sign("POST", host, "/", headers, body, Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token),
                "eu-west-1", "kinesis", now=NOW)
    scheme = "http" if ":" in host else "https"
    assert ours["Authorization"] == botocore_authorization(f"{scheme}://{host}/", headers, body, token)
    assert ours["X-Amz-Date"] == "20251124T160000Z"
    assert ("X-Amz-Security-Token" in ours) == (token is not None)


class Scripted(BaseHTTPRequestHandler):
    """Answers each POST with the next scripted (status, headers, body); records what came."""

    protocol_version = "HTTP/1.1"  # keep-alive
    script: ClassVar[list[tuple[int, dict[str, str], bytes]]] = []
    seen: ClassVar[list[tuple[dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(({k.lower(): v for k, v in self.headers.items()}, body))
        status, headers, payload = type(self).script.pop(0)
        self.send_response(status)
        for name, value in {"Content-Length": str(len(payload)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[type[Scripted]]:
    handler = type("Handler", (Scripted,), {"script": [], "seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield handler
    httpd.shutdown()
    httpd.server_close()


def client_for(server: type[Scripted], **kw: Any) -> LeanKinesisClient:
    static = Credentials("AKID", "secret")
    return LeanKinesisClient("us-east-1", CredentialSource(lambda: static, "static"), server.url,  # type: ignore[attr-defined]
                             rng=lambda: 0.0, sleep=lambda _s: None, **kw)


def test_put_records_sends_base64_json_1_1_and_returns_kinesis_answer(server: type[Scripted]) -> None:
    answer = {"FailedRecordCount": 1, "Records": [{"SequenceNumber": "1", "ShardId": "shardId-0"},
                                                  {"ErrorCode": "ProvisionedThroughputExceededException",
                                                   "ErrorMessage": "slow down"}]}
    server.script.append((200, {}, orjson.dumps(answer)))
    response = client_for(server).put_records(
        StreamName="s", Records=[{"Data": b"\x00hi", "PartitionKey": "a"},
                                 {"Data": b"x", "PartitionKey": "b", "ExplicitHashKey": "7"}])
    assert response == answer
    headers, body = server.seen[0]
    assert headers["x-amz-target"] == "Kinesis_20131202.PutRecords"
    assert headers["content-type"] == "application/x-amz-json-1.1"
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKID/")
    sent = orjson.loads(body)
    assert sent["StreamName"] == "s"
    assert [base64.b64decode(r["Data"]) for r in sent["Records"]] == [b"\x00hi", b"x"]
    assert sent["Records"][1]["ExplicitHashKey"] == "7"


@pytest.mark.parametrize(("status", "payload", "headers", "code", "action"), [
    (400, {"__type": "ResourceNotFoundException", "message": "Stream s not found"}, {},
     "ResourceNotFoundException", Action.HOLD),
    (400, {"__type": "com.amazonaws.kinesis#AccessDeniedException", "message": "no"}, {},
     "AccessDeniedException", Action.HOLD),
    (400, {"__type": "KMSThrottlingException", "message": "kms"}, {}, "KMSThrottlingException", Action.RETRY),
    (400, {"__type": "KMSAccessDeniedException", "message": "kms"}, {}, "KMSAccessDeniedException", Action.HOLD),
    (400, {"__type": "ValidationException", "message": "bad"}, {}, "ValidationException", Action.BISECT),
    (400, {"message": "bad"}, {"x-amzn-ErrorType": "InvalidArgumentException:http://internal/"},
     "InvalidArgumentException", Action.BISECT),
])
def test_errors_are_mapped_to_botocores_shape_and_the_sinks_actions(
        server: type[Scripted], status: int, payload: dict[str, str], headers: dict[str, str], code: str,
        action: Action) -> None:
    server.script.append((status, headers, orjson.dumps(payload)))
    with pytest.raises(ServiceError) as caught:
        client_for(server).describe_stream_summary(StreamName="s")
    assert caught.value.response["Error"]["Code"] == code
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert f"({code}) when calling the DescribeStreamSummary operation" in str(caught.value)
    assert classify(caught.value) == (action, code)
    assert len(server.seen) == 1  # not a retryable error: one attempt


def test_throttling_and_5xx_are_retried_up_to_three_attempts(server: type[Scripted]) -> None:
    throttled = (400, {}, orjson.dumps({"__type": "ProvisionedThroughputExceededException", "message": "x"}))
    server.script += [throttled, (503, {}, b""), (200, {}, orjson.dumps({"Shards": []}))]
    assert client_for(server).list_shards(StreamName="s") == {"Shards": []}
    server.script += [throttled, throttled, throttled, throttled]
    with pytest.raises(ServiceError) as caught:
        client_for(server).list_shards(StreamName="s")
    assert classify(caught.value) == (Action.RETRY, "ProvisionedThroughputExceededException")
    assert len(server.seen) == 6
    assert classify(ServiceError("500", "", 500, "PutRecords"))[0] is Action.RETRY


def test_keep_alive_connection_is_reused(server: type[Scripted]) -> None:
    client = client_for(server)
    ports = []
    for _ in range(3):
        server.script.append((200, {}, b"{}"))
        client.describe_stream_summary(StreamName="s")
        ports.append(next(iter(client._pools.values()))._idle[-1].sock.getsockname()[1])
    assert len(set(ports)) == 1


def test_a_read_timeout_is_a_retryable_transport_error() -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts (kernel backlog) but never answers
    try:
        client = LeanKinesisClient("us-east-1", CredentialSource(lambda: Credentials("a", "b"), "static"),
                                   f"http://127.0.0.1:{listener.getsockname()[1]}", read_timeout_s=0.05,
                                   rng=lambda: 0.0, sleep=lambda _s: None)
        with pytest.raises(ReadTimeoutError) as caught:
            client.describe_stream_summary(StreamName="s")
        assert classify(caught.value) == (Action.RETRY, "ReadTimeoutError")
    finally:
        listener.close()


def test_endpoint_follows_stream_arn_account_like_boto3(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    client = make_lean_client("eu-west-1", environ=env)
    arn = "arn:aws:kinesis:eu-west-1:123456789012:stream/s"
    assert client._pool_for({"StreamARN": arn}, "data").endpoint.url == \
        "https://123456789012.data-kinesis.eu-west-1.amazonaws.com"
    assert client._pool_for({"StreamARN": arn}, "control").endpoint.url == \
        "https://123456789012.control-kinesis.eu-west-1.amazonaws.com"
    assert client.meta.endpoint_url == "https://kinesis.eu-west-1.amazonaws.com"
    assert make_lean_client("eu-west-1", environ={**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}).meta.endpoint_url \
        == "http://127.0.0.1:9"
    both = {**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ENDPOINT_URL_KINESIS": "http://127.0.0.1:8"}
    assert make_lean_client("eu-west-1", environ=both).meta.endpoint_url == "http://127.0.0.1:8"
    ignored = {**both, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}
    assert make_lean_client("eu-west-1", environ=ignored).meta.endpoint_url == "https://kinesis.eu-west-1.amazonaws.com"


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def test_temporary_credentials_refresh_in_the_advisory_window_and_fail_only_past_the_mandatory_one() -> None:
    clock = Clock()
    calls: list[int] = []
    failing = threading.Event()

    def fetch() -> Credentials:
        calls.append(1)
        if failing.is_set():
            raise CredentialRetrievalError("test", "down")
        return Credentials(f"AK{len(calls)}", "s", "t", clock.now + 3600)

    source = CredentialSource(fetch, "test", clock)
    assert source.get().access_key == "AK1"
    clock.now += 3600 - ADVISORY_S - 1
    assert source.get().access_key == "AK1" and len(calls) == 1   # more than 15 min left: kept
    clock.now += 2
    assert source.get().access_key == "AK2"                       # advisory window: refreshed
    failing.set()
    clock.now += 3600 - ADVISORY_S + 1
    assert source.get().access_key == "AK2"                       # refresh failed, 10+ min left: kept
    clock.now += ADVISORY_S - MANDATORY_S
    with pytest.raises(CredentialRetrievalError):
        source.get()                                              # mandatory window: raises
    assert classify(CredentialRetrievalError("x", "y"))[0] is Action.HOLD
