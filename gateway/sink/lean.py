"""The gateway's own Kinesis client: PutRecords, ListShards and DescribeStreamSummary, nothing else.

Why: boto3's client is ~28 MB of a gateway that otherwise needs ~25 MB (docs/performance.md,
"Memory"). These three calls are JSON 1.1 POSTs to ``/``: the body is orjson, the signature
``gateway.sink.sigv4``, the connection ``gateway.sink.httpconn``, the credentials
``gateway.sink.credentials``. The answers are returned as Kinesis sends them, which is the shape
the sink reads from boto3 (``Records``/``SequenceNumber``/``ErrorCode``, ``Shards``,
``StreamDescriptionSummary``); errors are ``gateway.sink.errors``, shaped like botocore's.

Invariants owned here, as the boto3 client was configured before (``gateway.sink.aws``):
- at most 3 attempts per call (standard retry mode's count): a retry only after throttling, a 5xx
  or a transport error, after ``random() * 2**(attempt-1)`` seconds (capped at 20 s); everything
  else is the sink's to retry;
- the endpoint is ``AWS_ENDPOINT_URL_KINESIS``, else the profile's ``services`` entry, else
  ``AWS_ENDPOINT_URL``, else the profile's ``endpoint_url`` (none of them with
  ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true``), else AWS's own, by stream ARN account as boto3
  resolves it (``ACCOUNT.data-kinesis.REGION`` for PutRecords, ``control-kinesis`` otherwise);
- one connection pool per endpoint, shared by the sink's threads (the client is thread-safe).
"""

from __future__ import annotations

import base64
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from types import SimpleNamespace
from typing import Any

import orjson

from gateway import __version__
from gateway.model import is_stream_arn
from gateway.sink.credentials import (
    CredentialSource,
    assume_role,
    default_chain,
    profile_settings,
    services_endpoint,
    sts_endpoint,
)
from gateway.sink.errors import AwsError, NoRegionError, ServiceError, TransportError
from gateway.sink.httpconn import ConnectionPool, Endpoint, Proxy
from gateway.sink.sigv4 import sign

__all__ = ["ROLE_DURATION_S", "LeanKinesisClient", "make_lean_client"]

ROLE_DURATION_S = 3600  # below ~15 min every call would refresh (advisory window)
_TARGET = "Kinesis_20131202."
_CONTENT_TYPE = "application/x-amz-json-1.1"
_MAX_ATTEMPTS = 3
_MAX_BACKOFF_S = 20.0
_THROTTLES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "ProvisionedThroughputExceededException", "TransactionInProgressException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled", "SlowDown",
    "PriorRequestNotComplete", "EC2ThrottledException",
})
_TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete"})
_USER_AGENT = f"mqtt-kinesis-gateway/{__version__}"


def _configured_endpoint(environ: Mapping[str, str], profile: Mapping[str, str]) -> str | None:
    if (environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS") or "").lower() == "true":
        return None
    return (environ.get("AWS_ENDPOINT_URL_KINESIS") or services_endpoint(environ, profile, "kinesis")
            or environ.get("AWS_ENDPOINT_URL") or profile.get("endpoint_url") or None)


def _b64(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(value).decode("ascii")
    return value


class LeanKinesisClient:
    """The slice of boto3's Kinesis client the sink calls (``gateway.sink.clients.KinesisClient``)."""

    def __init__(self, region: str, credentials: CredentialSource, endpoint_url: str | None, *,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 10.0, max_pool_connections: int = 10,
                 ca_bundle: str | None = None, rng: Callable[[], float] = random.random,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.region = region
        self.credentials = credentials
        self._endpoint_url = endpoint_url
        self._suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
        self._pool_args: dict[str, Any] = {"connect_timeout_s": connect_timeout_s, "read_timeout_s": read_timeout_s,
                                           "max_idle": max(1, max_pool_connections), "ca_bundle": ca_bundle}
        self._pools: dict[str, ConnectionPool] = {}
        self._lock = threading.Lock()
        self._rng = rng
        self._sleep = sleep
        default = endpoint_url or f"https://kinesis.{region}.{self._suffix}"
        self.meta = SimpleNamespace(endpoint_url=default, region_name=region)

    # ---- the three calls ----------------------------------------------------------------------

    def put_records(self, **kwargs: Any) -> dict[str, Any]:
        # The base64 copies live only until the body is made: a 5 MiB request held for its retries
        # is then one body, not the body plus a list of its strings (docs/settings.md).
        body = orjson.dumps({**kwargs, "Records": [{k: _b64(v) for k, v in record.items()}
                                                   for record in kwargs["Records"]]})
        return self._call("PutRecords", kwargs, "data", body)

    def list_shards(self, **kwargs: Any) -> dict[str, Any]:
        return self._call("ListShards", kwargs, "control", orjson.dumps(kwargs))

    def describe_stream_summary(self, **kwargs: Any) -> dict[str, Any]:
        return self._call("DescribeStreamSummary", kwargs, "control", orjson.dumps(kwargs))

    def close(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    # ---- one call ----------------------------------------------------------------------------

    def _pool_for(self, params: Mapping[str, Any], kind: str) -> ConnectionPool:
        url = self._endpoint_url
        if url is None:
            arn = params.get("StreamARN")
            account = arn.split(":")[4] if isinstance(arn, str) and is_stream_arn(arn) else ""
            host = f"{account}.{kind}-kinesis" if account.isdigit() else "kinesis"
            url = f"https://{host}.{self.region}.{self._suffix}"
        pool = self._pools.get(url)
        if pool is None:
            with self._lock:
                pool = self._pools.get(url)
                if pool is None:
                    pool = self._pools[url] = ConnectionPool(Endpoint.parse(url), **self._pool_args)
        return pool

    def _call(self, operation: str, params: Mapping[str, Any], kind: str, body: bytes) -> dict[str, Any]:
        """POST ``body`` (``params`` as JSON) with the SDK's retries; ``params`` picks the endpoint."""
        pool = self._pool_for(params, kind)
        ep = pool.endpoint
        base = {"Content-Type": _CONTENT_TYPE, "X-Amz-Target": _TARGET + operation, "User-Agent": _USER_AGENT}
        attempt = 1
        while True:
            try:
                headers = sign("POST", ep.host_header, ep.path.split("?", 1)[0], base, body,
                               self.credentials.get(), self.region, "kinesis")
                reply = pool.request("POST", headers, body)
                if reply.status == 200:
                    result: dict[str, Any] = orjson.loads(reply.body) if reply.body else {}
                    return result
                raise _service_error(operation, reply.status, reply.headers, reply.body)
            except (ServiceError, TransportError) as exc:
                if attempt >= _MAX_ATTEMPTS or not _retryable(exc):
                    raise
            self._sleep(min(_MAX_BACKOFF_S, self._rng() * 2 ** (attempt - 1)))
            attempt += 1


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, TransportError):
        return True
    assert isinstance(exc, ServiceError)
    return exc.code in _THROTTLES or exc.code in _TRANSIENT_CODES or exc.status in (500, 502, 503, 504)


def _service_error(operation: str, status: int, headers: Mapping[str, str], body: bytes) -> ServiceError:
    """Kinesis' JSON error (``__type``, ``message``), or the ``x-amzn-errortype`` header."""
    code, message = "", ""
    try:
        data = orjson.loads(body) if body else {}
        if isinstance(data, dict):
            code = str(data.get("__type") or data.get("code") or "")
            message = str(data.get("message") or data.get("Message") or "")
    except orjson.JSONDecodeError:
        message = body[:300].decode(errors="replace")
    code = code or headers.get("x-amzn-errortype", "")
    code = code.split(":", 1)[0].rsplit("#", 1)[-1].strip()
    return ServiceError(code or str(status), message, status, operation)


def make_lean_client(region: str | None, assume_role_arn: str | None = None, session_name: str | None = None,
                     max_pool_connections: int = 10, *, connect_timeout_s: float = 5.0, read_timeout_s: float = 10.0,
                     environ: Mapping[str, str] | None = None,
                     clock: Callable[[], float] = time.time) -> LeanKinesisClient:
    """The lean client for ``region`` (else ``AWS_DEFAULT_REGION``/``AWS_REGION``/the profile's);
    raises NoRegionError without one. Credentials are resolved on first use."""
    env = os.environ if environ is None else environ
    profile = profile_settings(env)
    region = region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or profile.get("region")
    if not region:
        raise NoRegionError()
    ca_bundle = env.get("AWS_CA_BUNDLE") or profile.get("ca_bundle") or None
    try:   # a proxy setting that cannot work is a start-up error, not a failure of every request
        Proxy.for_endpoint(Endpoint.parse(_configured_endpoint(env, profile) or f"https://kinesis.{region}.amazonaws.com"))
    except ValueError as exc:
        raise AwsError(str(exc)) from None
    lazy = _LazyChain(env, region, clock)
    source: CredentialSource = lazy
    if assume_role_arn:
        source = assume_role(lazy, assume_role_arn, session_name or "mqtt-kinesis-gateway", ROLE_DURATION_S,
                             sts_endpoint(env, profile, region), region, ca_bundle, clock)
    return LeanKinesisClient(region, source, _configured_endpoint(env, profile), connect_timeout_s=connect_timeout_s,
                             read_timeout_s=read_timeout_s, max_pool_connections=max_pool_connections,
                             ca_bundle=ca_bundle)


class _LazyChain(CredentialSource):
    """The default chain, resolved on first use (as botocore does), then kept."""

    def __init__(self, environ: Mapping[str, str], region: str, clock: Callable[[], float]) -> None:
        super().__init__(self._first, "default-chain", clock)
        self._environ, self._region, self._clock_fn = environ, region, clock
        self._chosen: CredentialSource | None = None
        self._choose = threading.Lock()

    def _first(self) -> Any:
        raise AssertionError("unused")

    def get(self) -> Any:
        chosen = self._chosen
        if chosen is None:
            with self._choose:
                if self._chosen is None:
                    self._chosen = default_chain(self._environ, self._region, clock=self._clock_fn)
                    self.method = self._chosen.method
                chosen = self._chosen
        return chosen.get()
