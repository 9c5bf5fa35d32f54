"""Which Kinesis client a stream's requests go with: one client per region.

Why: a route may name its stream by ARN, and an ARN names its region. Sent with the client of
``AWS_REGION``, a request for a stream in another region is answered ResourceNotFoundException,
and the sink would hold and retry it forever. So the region of a stream ARN decides the client it
is sent with; a stream given by name goes with the default region (``AWS_REGION``, or the AWS
profile's). This is decided here, when the routes are loaded, and not by ``validate``: validate
runs offline and cannot know the region the gateway will run with, while an ARN is unambiguous.

Invariant owned here: at most one client per region, made by the factory (the process uses
``gateway.sink.lean.make_lean_client``; tools and tests may bring boto3's) and shared by every
thread. ``prepare`` makes the clients of a route table's streams when it is loaded or reloaded,
so requests do not wait for one to be built; a stream that was not prepared gets its client on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from gateway.model import is_stream_arn

__all__ = ["KinesisClient", "RegionalClients", "region_of"]


class KinesisClient(Protocol):
    """The slice of a Kinesis client the sink calls (``gateway.sink.lean``, or boto3's)."""

    def put_records(self, **kwargs: Any) -> dict[str, Any]: ...
    def list_shards(self, **kwargs: Any) -> dict[str, Any]: ...
    def describe_stream_summary(self, **kwargs: Any) -> dict[str, Any]: ...


def region_of(stream: str) -> str | None:
    """The region a stream ARN names (``arn:PARTITION:kinesis:REGION:ACCOUNT:stream/NAME``);
    None for a stream name."""
    if not is_stream_arn(stream):
        return None
    parts = stream.split(":", 5)
    return (parts[3] or None) if len(parts) == 6 else None


class RegionalClients:
    """Kinesis clients by region, made on demand by ``make_client(region)``."""

    def __init__(self, make_client: Callable[[str | None], KinesisClient], default_region: str | None = None) -> None:
        self._make_client = make_client
        self._default_region = default_region
        self._by_region: dict[str | None, KinesisClient] = {}
        self._by_stream: dict[str, KinesisClient] = {}
        self._lock = threading.Lock()

    @classmethod
    def sharing(cls, client: KinesisClient) -> RegionalClients:
        """Every stream goes with ``client`` (tests and tools that bring their own client)."""
        return cls(lambda _region: client)

    def prepare(self, streams: Iterable[str]) -> None:
        """Make the clients these streams need now (called when routes are loaded or reloaded)."""
        for stream in streams:
            self.for_stream(stream)

    def for_stream(self, stream: str) -> KinesisClient:
        """The client for ``stream``: the one of its ARN's region, else the default one."""
        client = self._by_stream.get(stream)
        if client is not None:
            return client
        region = region_of(stream)
        key = None if region is None or region == self._default_region else region
        with self._lock:
            client = self._by_region.get(key)
            if client is None:
                client = self._make_client(self._default_region if key is None else key)
                self._by_region[key] = client
            self._by_stream[stream] = client
        return client

    def endpoint(self, stream: str) -> str:
        """Where ``stream``'s requests go, for log lines: the client's endpoint URL."""
        meta = getattr(self.for_stream(stream), "meta", None)
        url = getattr(meta, "endpoint_url", None)
        return str(url) if url else "the default endpoint"
