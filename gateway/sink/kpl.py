"""KPL aggregation: many small user records packed into one Kinesis record, per shard.

Format (awslabs/amazon-kinesis-producer aggregation-format.md): magic f3 89 9a c2, a proto2
`AggregatedRecord` (1: repeated string partition_key_table, 2: repeated string
explicit_hash_key_table, 3: repeated Record records, where Record is 1: uint64
partition_key_index, 2: uint64 explicit_hash_key_index, 3: bytes data), then the MD5 of the
protobuf bytes. The encoder is written by hand (varints and length-delimited fields) so the
gateway needs no protobuf dependency.

Invariant owned here: every user record inside an aggregate hashes into the same shard as the
aggregate's own explicit hash key, according to the newest shard map we have. Consumers (KCL)
drop sub-records whose hash key falls outside the shard they read, so aggregating across
shards would lose data there. Without a shard map (ListShards denied) an aggregate only packs
records with the very same hash key, which is correct under any resharding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Generic, TypeVar

from gateway.sink.batching import Entry
from gateway.sink.shards import ShardMap

__all__ = ["MAGIC", "aggregate", "encode_aggregate", "hash_key"]

T = TypeVar("T")

MAGIC = b"\xf3\x89\x9a\xc2"
_DIGEST_BYTES = 16
_OVERHEAD = len(MAGIC) + _DIGEST_BYTES
_TAG_PK = b"\x0a"  # field 1, length-delimited
_TAG_EHK = b"\x12"  # field 2, length-delimited
_TAG_RECORD = b"\x1a"  # field 3, length-delimited
_TAG_REC_PK_INDEX = b"\x08"  # Record field 1, varint
_TAG_REC_EHK_INDEX = b"\x10"  # Record field 2, varint
_TAG_REC_DATA = b"\x1a"  # Record field 3, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def hash_key(partition_key: str) -> int:
    """Kinesis' shard routing: the MD5 of the UTF-8 key as a 128-bit unsigned integer."""
    return int.from_bytes(hashlib.md5(partition_key.encode("utf-8")).digest(), "big")


def encode_aggregate(
    partition_keys: Sequence[str],
    explicit_hash_keys: Sequence[str],
    records: Sequence[tuple[int, int | None, bytes]],
) -> bytes:
    """Encode one aggregated record from key tables and (pk index, ehk index, data) rows."""
    parts: list[bytes] = [MAGIC]
    for key in partition_keys:
        raw = key.encode("utf-8")
        parts += (_TAG_PK, _varint(len(raw)), raw)
    for key in explicit_hash_keys:
        raw = key.encode("ascii")
        parts += (_TAG_EHK, _varint(len(raw)), raw)
    for pk_index, ehk_index, data in records:
        head = _TAG_REC_PK_INDEX + _varint(pk_index)
        if ehk_index is not None:
            head += _TAG_REC_EHK_INDEX + _varint(ehk_index)
        head += _TAG_REC_DATA + _varint(len(data))
        parts += (_TAG_RECORD, _varint(len(head) + len(data)), head, data)
    body_and_magic = b"".join(parts)
    return body_and_magic + hashlib.md5(memoryview(body_and_magic)[len(MAGIC):]).digest()


class _Builder(Generic[T]):
    """Accumulates user records for one aggregate, tracking its exact encoded size."""

    __slots__ = ("body", "ehks", "entries", "hash", "outer_key_bytes", "pks", "rows", "shard")

    def __init__(self, first: Entry[T], h: int, shard: str | None) -> None:
        self.pks: dict[str, int] = {}
        self.ehks: dict[str, int] = {}
        self.rows: list[tuple[int, int | None, bytes]] = []
        self.entries: list[Entry[T]] = []
        self.body = 0
        self.outer_key_bytes = len(first.pk.encode("utf-8"))
        self.hash = h
        self.shard = shard

    def cost(self, entry: Entry[T]) -> int:
        """Bytes the protobuf body grows by when `entry` is added."""
        added = 0
        pk_index = self.pks.get(entry.pk)
        if pk_index is None:
            raw = len(entry.pk.encode("utf-8"))
            added += 1 + _varint_len(raw) + raw
            pk_index = len(self.pks)
        inner = 1 + _varint_len(pk_index) + 1 + _varint_len(len(entry.data)) + len(entry.data)
        if entry.ehk is not None:
            ehk_index = self.ehks.get(entry.ehk)
            if ehk_index is None:
                added += 1 + _varint_len(len(entry.ehk)) + len(entry.ehk)
                ehk_index = len(self.ehks)
            inner += 1 + _varint_len(ehk_index)
        return added + 1 + _varint_len(inner) + inner

    def record_size(self, extra_body: int = 0) -> int:
        """What Kinesis counts: aggregate bytes plus the outer partition key."""
        return _OVERHEAD + self.body + extra_body + self.outer_key_bytes

    def add(self, entry: Entry[T], cost: int) -> None:
        pk_index = self.pks.setdefault(entry.pk, len(self.pks))
        ehk_index = None if entry.ehk is None else self.ehks.setdefault(entry.ehk, len(self.ehks))
        self.rows.append((pk_index, ehk_index, entry.data))
        self.entries.append(entry)
        self.body += cost

    def finish(self) -> Entry[T]:
        if len(self.entries) == 1:
            return self.entries[0]  # an aggregate of one is just overhead: send it plain
        first = self.entries[0]
        data = encode_aggregate(tuple(self.pks), tuple(self.ehks), self.rows)
        return Entry(
            first.pk,
            data,
            str(self.hash),
            len(data) + self.outer_key_bytes,
            first.route,
            first.token,
            min(e.born for e in self.entries),
            members=[(e.route, e.token) for e in self.entries],
            shard=self.shard,
        )


def aggregate(entries: Sequence[Entry[T]], shard_map: ShardMap | None, max_bytes: int) -> list[Entry[T]]:
    """Pack user records into aggregates of at most max_bytes, one group per shard.

    Each aggregate takes its first record's partition key as the outer key and that record's
    hash key as ExplicitHashKey, which lies in the shard all its members hash to. A record too
    large to share an aggregate is passed through plain.
    """
    groups: dict[str | int, list[tuple[Entry[T], int]]] = {}
    for entry in entries:
        h = int(entry.ehk) if entry.ehk is not None else hash_key(entry.pk)
        shard = shard_map.shard_for(h) if shard_map is not None else None
        groups.setdefault(shard if shard is not None else h, []).append((entry, h))
    out: list[Entry[T]] = []
    for key, items in groups.items():
        shard = key if isinstance(key, str) else None
        builder: _Builder[T] | None = None
        for entry, h in items:
            if builder is not None:
                cost = builder.cost(entry)
                if builder.record_size(cost) <= max_bytes:
                    builder.add(entry, cost)
                    continue
                out.append(builder.finish())
            builder = _Builder(entry, h, shard)
            cost = builder.cost(entry)
            if builder.record_size(cost) > max_bytes:
                out.append(entry)
                builder = None
            else:
                builder.add(entry, cost)
        if builder is not None:
            out.append(builder.finish())
    return out
