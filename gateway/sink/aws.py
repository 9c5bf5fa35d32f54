"""How the gateway's boto3 Kinesis clients are made.

Create a client once and share it: botocore clients are thread-safe once created, sessions are
not, so each client gets a session of its own. Credentials come from boto3's own chain
(environment, profile, web identity on EKS, container or instance role); an assumed role uses
botocore's own refreshable credentials, so nothing here re-implements expiry handling. The
endpoint comes from boto3 as well (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_KINESIS or the config
file), which is how local stand-ins such as moto are reached.
"""

from __future__ import annotations

from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.credentials import (
    AssumeRoleCredentialFetcher,
    CredentialProvider,
    DeferredRefreshableCredentials,
)

__all__ = ["ROLE_DURATION_S", "make_kinesis_client"]

# Below ~15 min botocore refreshes on every call (advisory window); 1 h is the STS default cap.
ROLE_DURATION_S = 3600
_DEFAULT_SESSION_NAME = "mqtt-kinesis-gateway"


class _AssumeRoleProvider(CredentialProvider):
    """Puts refreshable assumed-role credentials at the head of botocore's provider chain."""

    METHOD = "gateway-assume-role"
    CANONICAL_NAME = "custom-gateway-assume-role"

    def __init__(self, credentials: DeferredRefreshableCredentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> DeferredRefreshableCredentials:
        return self._credentials


def make_kinesis_client(
    region: str | None,
    assume_role_arn: str | None = None,
    session_name: str | None = None,
    max_pool_connections: int = 10,
    *,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 10.0,
) -> Any:
    """Build the shared Kinesis client.

    botocore's retries are pinned to standard mode with 3 attempts in total so behaviour cannot shift
    with the installed version; the sink retries on top of that without limit. Parameter
    validation is off (about 30 % of client CPU per record) because the sink checks every
    limit itself before sending.
    """
    config = Config(
        region_name=region or None,
        # total_max_attempts counts the first try; botocore's max_attempts counts only retries
        # (max_attempts=3 would mean 4 calls). 3 is standard mode's own default.
        retries={"mode": "standard", "total_max_attempts": 3},
        parameter_validation=False,
        tcp_keepalive=True,
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        max_pool_connections=max(1, max_pool_connections),
    )
    core = botocore.session.Session()
    if assume_role_arn:
        source = botocore.session.Session()
        if region:
            source.set_config_variable("region", region)
        source_credentials = source.get_credentials()
        fetcher = AssumeRoleCredentialFetcher(
            client_creator=source.create_client,
            source_credentials=source_credentials,
            role_arn=assume_role_arn,
            extra_args={
                "RoleSessionName": session_name or _DEFAULT_SESSION_NAME,
                "DurationSeconds": ROLE_DURATION_S,
            },
        )
        credentials = DeferredRefreshableCredentials(
            refresh_using=fetcher.fetch_credentials, method="assume-role"
        )
        resolver = core.get_component("credential_provider")
        resolver.providers.insert(0, _AssumeRoleProvider(credentials))
    session = boto3.Session(botocore_session=core, region_name=region or None)
    return session.client("kinesis", config=config)
