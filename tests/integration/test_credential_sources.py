"""Every credential source the lean client resolves, each against a real local endpoint.

moto's server plays Kinesis and STS (AssumeRoleWithWebIdentity, AssumeRole); small HTTP servers
on 127.0.0.1 play the ECS / EKS Pod Identity credential endpoint and IMDSv2. Each test then makes
a real DescribeStreamSummary with what was resolved.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from gateway.sink import credentials as credentials_module
from gateway.sink.credentials import ADVISORY_S
from gateway.sink.errors import CredentialRetrievalError
from gateway.sink.lean import LeanKinesisClient, make_lean_client

ROLE = "arn:aws:iam::123456789012:role/gateway"
EXPIRES = "2099-01-01T00:00:00Z"


@pytest.fixture
def base_env(tmp_path: Path, kinesis_endpoint: Any) -> dict[str, str]:
    """No credentials anywhere yet; Kinesis and STS on moto; IMDS switched off."""
    return {"AWS_CONFIG_FILE": str(tmp_path / "absent-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "absent-credentials"),
            "AWS_ENDPOINT_URL_KINESIS": kinesis_endpoint.url, "AWS_ENDPOINT_URL_STS": kinesis_endpoint.url,
            "AWS_EC2_METADATA_DISABLED": "true"}


def works(client: LeanKinesisClient, stream: str) -> str:
    """The method the credentials came from, after a real call signed with them succeeded."""
    summary = client.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
    assert summary["StreamStatus"] == "ACTIVE"
    return client.credentials.method


def test_environment_credentials(base_env: dict[str, str], kinesis_stream: str) -> None:
    env = {**base_env, "AWS_ACCESS_KEY_ID": "AKIAENV", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t"}
    client = make_lean_client("us-east-1", environ=env)
    assert works(client, kinesis_stream) == "env"
    assert client.credentials.get().token == "t"


def test_shared_files_and_a_named_profile_give_keys_and_region(base_env: dict[str, str], tmp_path: Path,
                                                               kinesis_stream: str) -> None:
    (tmp_path / "config").write_text("[default]\nregion = eu-west-1\n[profile edge]\nregion = us-east-1\n")
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = d\n"
                                          "[edge]\naws_access_key_id = AKIAEDGE\naws_secret_access_key = e\n")
    env = {**base_env, "AWS_CONFIG_FILE": str(tmp_path / "config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "AWS_PROFILE": "edge"}
    client = make_lean_client(None, environ=env)
    assert client.region == "us-east-1"
    assert works(client, kinesis_stream) == "shared-credentials-file"
    assert client.credentials.get().access_key == "AKIAEDGE"
    del env["AWS_PROFILE"]
    assert make_lean_client(None, environ=env).credentials.get().access_key == "AKIADEFAULT"


def test_web_identity_token_file_is_exchanged_with_sts(base_env: dict[str, str], tmp_path: Path,
                                                        kinesis_stream: str) -> None:
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n")
    env = {**base_env, "AWS_WEB_IDENTITY_TOKEN_FILE": str(token), "AWS_ROLE_ARN": ROLE,
           "AWS_ROLE_SESSION_NAME": "irsa-test"}
    client = make_lean_client("us-east-1", environ=env)
    assert works(client, kinesis_stream) == "assume-role-with-web-identity"
    creds = client.credentials.get()
    assert creds.token and creds.expires_at is not None
    token.unlink()  # a token that cannot be read is a clear credential error, not a crash
    with pytest.raises(CredentialRetrievalError, match="token"):
        make_lean_client("us-east-1", environ=env).credentials.get()


class CredentialServer(BaseHTTPRequestHandler):
    """ECS / EKS Pod Identity credential endpoint and IMDSv2, by path; counts what it was asked."""

    protocol_version = "HTTP/1.1"
    authorization: str | None = None
    imds_token = "imds-session-token"
    asked: ClassVar[list[str]] = []

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        cls = type(self)
        cls.asked.append(f"GET {self.path}")
        creds = orjson.dumps({"AccessKeyId": f"ASIA{self.path.rsplit('/', 1)[-1].upper()}", "SecretAccessKey": "s",
                              "Token": "session", "Expiration": EXPIRES, "Code": "Success"})
        if self.path.startswith("/latest/"):
            if self.headers.get("X-aws-ec2-metadata-token") != cls.imds_token:
                return self._send(401, b"")
            if self.path == "/latest/meta-data/iam/security-credentials/":
                return self._send(200, b"edge-role")
            return self._send(200, creds)
        if cls.authorization is not None and self.headers.get("Authorization") != cls.authorization:
            return self._send(403, b'{"message": "bad token"}')
        return self._send(200, creds)

    def do_PUT(self) -> None:
        type(self).asked.append(f"PUT {self.path}")
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._send(200, type(self).imds_token.encode())
        return self._send(400, b"")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[tuple[type[CredentialServer], str]]:
    handler = type("Handler", (CredentialServer,), {"asked": [], "authorization": None})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_eks_pod_identity_full_uri_sends_the_token_files_content(
        base_env: dict[str, str], tmp_path: Path, stand_in: tuple[type[CredentialServer], str],
        kinesis_stream: str) -> None:
    handler, url = stand_in
    token = tmp_path / "eks-pod-identity-token"
    token.write_text("pod-token-1")
    handler.authorization = "pod-token-1"
    env = {**base_env, "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{url}/v1/credentials",
           "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token)}
    client = make_lean_client("us-east-1", environ=env)
    assert works(client, kinesis_stream) == "container-role"
    assert client.credentials.get().access_key == "ASIACREDENTIALS"
    handler.authorization = "pod-token-2"  # the kubelet rotated the token: read again on the next fetch
    token.write_text("pod-token-2")
    assert make_lean_client("us-east-1", environ=env).credentials.get().token == "session"
    token.write_text("stale")
    with pytest.raises(CredentialRetrievalError, match="HTTP 403"):
        make_lean_client("us-east-1", environ=env).credentials.get()


def test_ecs_relative_uri(base_env: dict[str, str], stand_in: tuple[type[CredentialServer], str],
                          monkeypatch: pytest.MonkeyPatch, kinesis_stream: str) -> None:
    handler, url = stand_in
    monkeypatch.setattr(credentials_module, "_ECS_HOST", url)  # 169.254.170.2 in a task
    env = {**base_env, "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/task-role"}
    client = make_lean_client("us-east-1", environ=env)
    assert works(client, kinesis_stream) == "container-role"
    assert handler.asked == ["GET /v2/credentials/task-role"]


def test_ec2_instance_role_over_imdsv2(base_env: dict[str, str], stand_in: tuple[type[CredentialServer], str],
                                       kinesis_stream: str) -> None:
    handler, url = stand_in
    env = {**base_env, "AWS_EC2_METADATA_SERVICE_ENDPOINT": url}
    del env["AWS_EC2_METADATA_DISABLED"]
    client = make_lean_client("us-east-1", environ=env)
    assert works(client, kinesis_stream) == "iam-role"
    assert client.credentials.get().access_key == "ASIAEDGE-ROLE"
    assert handler.asked == ["PUT /latest/api/token", "GET /latest/meta-data/iam/security-credentials/",
                             "GET /latest/meta-data/iam/security-credentials/edge-role"]


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_assume_role_arn_refreshes_before_expiry(base_env: dict[str, str], kinesis_stream: str) -> None:
    clock = Clock()
    env = {**base_env, "AWS_ACCESS_KEY_ID": "AKIASOURCE", "AWS_SECRET_ACCESS_KEY": "s"}
    client = make_lean_client("us-east-1", assume_role_arn=ROLE, session_name="edge-7", environ=env, clock=clock)
    assert works(client, kinesis_stream) == "assume-role"
    first = client.credentials.get()
    assert first.access_key != "AKIASOURCE" and first.expires_at is not None
    assert client.credentials.get() is first               # an hour left: no STS call
    clock.now = first.expires_at - ADVISORY_S + 1          # inside the advisory window
    second = client.credentials.get()
    assert second.access_key != first.access_key
    assert works(client, kinesis_stream) == "assume-role"


def test_a_profile_with_source_profile_is_resolved_by_botocore(base_env: dict[str, str], tmp_path: Path,
                                                                kinesis_stream: str) -> None:
    (tmp_path / "config").write_text(f"[profile gw]\nrole_arn = {ROLE}\nsource_profile = base\nregion = us-east-1\n")
    (tmp_path / "credentials").write_text("[base]\naws_access_key_id = AKIABASE\naws_secret_access_key = b\n")
    env = {**base_env, "AWS_CONFIG_FILE": str(tmp_path / "config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"), "AWS_PROFILE": "gw"}
    with pytest.MonkeyPatch.context() as mp:  # botocore reads os.environ itself
        for name, value in env.items():
            mp.setenv(name, value)
        client = make_lean_client(None, environ=env)
        assert works(client, kinesis_stream) == "botocore"
        assert client.credentials.get().access_key != "AKIABASE"


def test_the_running_gateway_does_not_import_boto3(base_env: dict[str, str], kinesis_stream: str,
                                                    tmp_path: Path) -> None:
    script = ("import sys\nfrom gateway.app import Gateway\nfrom gateway.sink.lean import make_lean_client\n"
              f"make_lean_client('us-east-1').describe_stream_summary(StreamName={kinesis_stream!r})\n"
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'boto3', 'botocore', 'urllib3', 'awscrt'}))\n")
    env = {**base_env, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


