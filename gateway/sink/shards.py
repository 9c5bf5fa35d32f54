"""A stream's open shards by hash-key range: what KPL aggregation packs records by.

Apart from the aggregation itself so that the per-stream state can hold a shard map without the
sink's modules importing each other in a circle.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.model import stream_target

__all__ = ["ShardLister", "ShardMap", "StreamDescriber", "load_shard_map", "open_shard_count"]


@dataclass(frozen=True)
class ShardMap:
    """Open shards of a stream by hash key range, sorted by starting hash key."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    ids: tuple[str, ...]

    def shard_for(self, h: int) -> str | None:
        i = bisect.bisect_right(self.starts, h) - 1
        if i >= 0 and h <= self.ends[i]:
            return self.ids[i]
        return None


class ShardLister(Protocol):
    """The one client call a shard map needs."""

    def list_shards(self, **kwargs: Any) -> dict[str, Any]: ...


def load_shard_map(client: ShardLister, stream: str) -> ShardMap:
    """Read the open shards with ListShards (paginated); closed parents take no writes."""
    kwargs: dict[str, Any] = stream_target(stream)
    shards: list[dict[str, Any]] = []
    while True:
        response = client.list_shards(**kwargs)
        shards.extend(response.get("Shards", []))
        token = response.get("NextToken")
        if not token:
            break
        kwargs = {"NextToken": token}  # ListShards refuses the stream name together with a token
    rows = sorted(
        (int(s["HashKeyRange"]["StartingHashKey"]), int(s["HashKeyRange"]["EndingHashKey"]), s["ShardId"])
        for s in shards
        if "EndingSequenceNumber" not in s.get("SequenceNumberRange", {})
    )
    return ShardMap(tuple(r[0] for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows))


class StreamDescriber(Protocol):
    def describe_stream_summary(self, **kwargs: Any) -> dict[str, Any]: ...


def open_shard_count(client: StreamDescriber, stream: str) -> int | None:
    """The stream's open shards (DescribeStreamSummary's OpenShardCount): what a drain is paced by.
    None when the answer has no count; errors are the caller's to handle."""
    summary = client.describe_stream_summary(**stream_target(stream)).get("StreamDescriptionSummary", {})
    count = summary.get("OpenShardCount") if isinstance(summary, dict) else None
    return count if isinstance(count, int) and count > 0 else None
