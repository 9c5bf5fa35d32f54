"""The Go bridge's documented `.env` runs unchanged: `run` with no route file, no other settings.

The file is written the way its README shows it (a leading space on every line, USER/PASS empty,
STDOUT=true, the AWS_* placeholders including the assumed role). Only the values that must point
at the local stand-ins change (BROKER, PORT, KIN_STREAM_NAME), and the endpoint lines that a user
of a local Kinesis would add are appended. The role is assumed through moto's STS, so the gateway
writes with the assumed role's credentials into the role's account (111111111111 in moto), which
is where the test creates and reads the stream: a record there proves the role was used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.support.gatewayproc import GatewayProcess
from tests.support.oracle import emit, wait_delivered
from tests.support.publisher import Publisher, welder_payload
from tests.support.services import Mosquitto, MotoServer, create_stream, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROLE_ARN = "arn:aws:iam::111111111111:role/service-role/kinesis-endpoint-access"
ROLE_ACCOUNT = "111111111111"


def seed_env(*, port: int, stream: str, qos: int, endpoint: str) -> str:
    """The seed README's .env; BROKER/PORT/KIN_STREAM_NAME/QOS values edited, endpoints added."""
    return f"""\
 PORT={port}
 WEBSOCKET=8080
 BROKER=127.0.0.1
 USER=
 PASS=
 CLIENTID=client-123
 TOPIC=homeassistant/sensor/#
 QOS={qos}
 BACKLOG_COUNT=2000
 KIN_STREAM_NAME={stream}
 KIN_MAXCONN=10
 KIN_SESSION_NAME=mysession-1234
 KIN_PARTITION_KEY=sensor-data
 AWS_ACCESS_KEY_ID=AKIDEXAMPLE
 AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI-seed-secret
 AWS_ASSUME_ROLE_ARN={ROLE_ARN}
 AWS_REGION=us-east-1
 STDOUT=true
 AWS_ENDPOINT_URL_KINESIS={endpoint}
 AWS_ENDPOINT_URL_STS={endpoint}
"""


def role_kinesis_client(endpoint: str) -> Any:
    """A Kinesis client in the role's account, through moto's STS like the gateway's."""
    sts = boto3.client("sts", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="testing")
    creds = sts.assume_role(RoleArn=ROLE_ARN, RoleSessionName="seed-env-test")["Credentials"]
    client = boto3.client("kinesis", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=creds["AccessKeyId"],
                          aws_secret_access_key=creds["SecretAccessKey"],
                          aws_session_token=creds["SessionToken"])
    return client


def sensor_topic(seq: int) -> str:
    return f"homeassistant/sensor/welder{seq % 3}/state"


@pytest.mark.parametrize("qos,where", [(0, "cwd"), (1, "env-file")],
                         ids=["qos0-dotenv-in-cwd", "qos1-env-file-flag"])
def test_seed_dotenv_runs_unchanged_with_static_key_and_stdout_echo(
        qos: int, where: str, tmp_path: Path, kinesis_endpoint: MotoServer,
        mosquitto: Mosquitto, gateway_process: Callable[..., GatewayProcess],
        publisher: Callable[..., Publisher]) -> None:
    n = 300
    kinesis = role_kinesis_client(kinesis_endpoint.url)
    stream = f"kinesis-data-stream-{qos}-{int(time.time() * 1000) % 10**8}"
    arn = create_stream(kinesis, stream)
    assert f":{ROLE_ACCOUNT}:" in arn
    workdir = tmp_path / "seed"
    workdir.mkdir()
    env_path = workdir / ".env"
    env_path.write_text(seed_env(port=mosquitto.port, stream=stream, qos=qos,
                                 endpoint=kinesis_endpoint.url), encoding="utf-8")
    http_port = free_port()
    # No MQTT_*/AWS_* from the harness (base_env=False): the .env is the whole configuration. Only
    # the health endpoint is pinned to 127.0.0.1 on a free port, so the harness can see readiness.
    health = {"HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(http_port)}
    if where == "cwd":
        gw = gateway_process(base_env=False, args=["run"], cwd=workdir, http_port=http_port,
                             extra_env=health)
    else:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        gw = gateway_process(base_env=False, args=["run", "--env-file", str(env_path)],
                             cwd=elsewhere, http_port=http_port, extra_env=health)
    started = time.monotonic()
    pub = publisher(topic_for=sensor_topic)
    pub.publish_range(n)
    assert pub.wait_acked(30)
    report, records = wait_delivered(kinesis, stream, pub.acked, n, timeout=60)
    elapsed = time.monotonic() - started
    keys = {r["partition_key"] for r in records}
    stdout = gw.stdout_text()
    echoed = sum(1 for seq in range(n)
                 if f"{sensor_topic(seq)} {welder_payload(seq).decode()}\n" in stdout)
    emit(f"seed-env-{where}-qos{qos}", f"{report} | partition keys={sorted(keys)} "
         f"stdout echo lines={echoed}/{n} duration={elapsed:.1f}s")
    report.assert_no_loss()
    assert report.received_unique == n and report.duplicates == 0
    assert keys == {"sensor-data"}
    assert echoed == n, f"STDOUT=true did not print every topic and payload:\n{stdout[-2000:]}"
    subscribed = f"homeassistant/sensor/# (QoS {qos})"
    assert subscribed in mosquitto.log_text(), "the seed's TOPIC/QOS were not what was subscribed"
    assert "client-123" in mosquitto.log_text(), "CLIENTID was not used"
    assert gw.alive
