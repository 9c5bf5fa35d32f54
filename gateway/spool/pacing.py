"""How fast the spool's sender may hand records to the Kinesis sink, per stream.

Why: after a long outage the spool holds far more than a stream takes. A shard accepts 1,000
records and 1 MiB per second; handing a backlog of a million records over at once would only turn
into throttled requests, each retried after its own backoff (docs/spool.md#draining). So the
sender asks this pacer first, and the pacer keeps each stream to what its open shards take.

Invariants owned here (pure: no I/O, no threads, time from the injected clock):
- per stream, what ``take`` allows over any interval ``t`` is at most ``rate × (t + burst_s)`` in
  records and in bytes, where ``rate`` is open shards × the per-shard limits × ``headroom`` × the
  current factor; the headroom (95 %) is there because keys never split perfectly evenly over the
  shards, and the retries of what a shard refused come out of the same allowance;
- a single record larger than the whole bucket still goes, once the bucket is full (it runs into
  debt), so a big record never waits for ever;
- entries the sink retried are charged to the allowance (``throttled(stream, n)``, debt bounded
  to one second's worth): the sink resends them whatever the pacer says, so new records wait;
- records handed over and not yet settled are at most ``window_s`` (1 s) of the rate
  (``take_many`` given what is unsettled): during an outage the sink holds no more than the
  shards take in a second, not the sender's whole in-flight bound, so the burst when the link
  returns fits in what a shard allows at once;
- throttling lowers the factor (multiplicatively, at most once per ``cooldown_s``, down to
  ``floor``) only while the stream is being paced, i.e. it spent allowance within ``cooldown_s``:
  the retries of an outage, or of records handed over before it, say nothing about the pace;
  the factor climbs back linearly to 1 over ``recover_s`` without throttling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

__all__ = ["SHARD_BYTES_PER_S", "SHARD_RECORDS_PER_S", "Pacer"]

SHARD_RECORDS_PER_S: Final = 1000
SHARD_BYTES_PER_S: Final = 1024 * 1024
_EPSILON: Final = 1e-6   # refills add up in floating point: a bucket 1e-12 short of a record is full


@dataclass
class _Bucket:
    shards: int
    records: float
    bytes: float
    at: float
    factor: float = 1.0
    lowered_at: float = float("-inf")
    spent_at: float = float("-inf")


class Pacer:
    """Token buckets, one per stream, sized from the stream's open shard count."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, burst_s: float = 0.2,
                 records_per_shard: float = SHARD_RECORDS_PER_S, bytes_per_shard: float = SHARD_BYTES_PER_S,
                 headroom: float = 0.95, decrease: float = 0.8, floor: float = 0.25, cooldown_s: float = 1.0,
                 recover_s: float = 5.0, window_s: float = 1.0) -> None:
        self._clock = clock
        self._burst_s = burst_s
        self._headroom = headroom
        self._window_s = window_s
        self._records_per_shard = records_per_shard
        self._bytes_per_shard = bytes_per_shard
        self._decrease = decrease
        self._floor = floor
        self._cooldown_s = cooldown_s
        self._recover_s = recover_s
        self._buckets: dict[str, _Bucket] = {}

    def known(self, stream: str) -> bool:
        """True once ``set_shards`` was told this stream's shard count."""
        return stream in self._buckets and self._buckets[stream].shards > 0

    def set_shards(self, stream: str, shards: int) -> None:
        """The stream's open shard count (DescribeStreamSummary's OpenShardCount)."""
        bucket = self._bucket(stream)
        bucket.shards = max(1, shards)

    def rate(self, stream: str) -> tuple[float, float]:
        """(records/s, bytes/s) the stream is paced at now."""
        bucket = self._refill(stream)
        return self._rates(bucket)

    def take(self, stream: str, records: int, n_bytes: int) -> float:
        """Spend ``records`` and ``n_bytes`` of the stream's allowance and return 0.0, or return how
        many seconds to wait before they fit (nothing spent then)."""
        return self.take_many(stream, ((records, n_bytes),))[1]

    def take_many(self, stream: str, costs: Iterable[tuple[int, int]],
                  unsettled: tuple[int, int] | None = None) -> tuple[int, float]:
        """``take`` for each (records, bytes) of ``costs`` in turn, stopping at the first that does
        not fit, or, given the ``unsettled`` (records, bytes) already with the sink, once the window
        is shut. Returns how many were granted and the seconds until the next one fits (0.0 when
        every cost went or the window stopped it). One refill for the whole hand-over, not two per
        record: the same answers as asking record by record at one instant."""
        bucket = self._refill(stream)
        per_s_records, per_s_bytes = self._rates(bucket)
        cap_records, cap_bytes = per_s_records * self._burst_s, per_s_bytes * self._burst_s
        full_records, full_bytes = cap_records - _EPSILON, cap_bytes - _EPSILON
        shut_records = shut_bytes = float("inf")
        out_records = out_bytes = 0
        if unsettled is not None:
            out_records, out_bytes = unsettled
            shut_records = max(1.0, per_s_records * self._window_s)
            shut_bytes = max(1.0, per_s_bytes * self._window_s)
        have_records, have_bytes = bucket.records, bucket.bytes
        granted, wait = 0, 0.0
        for records, n_bytes in costs:
            if out_records >= shut_records or out_bytes >= shut_bytes:
                break   # a settlement opens the window again
            fits_records = have_records >= records - _EPSILON or have_records >= full_records
            fits_bytes = have_bytes >= n_bytes - _EPSILON or have_bytes >= full_bytes
            if not (fits_records and fits_bytes):
                wait_records = 0.0 if fits_records else (min(records, cap_records) - have_records) / per_s_records
                wait_bytes = 0.0 if fits_bytes else (min(n_bytes, cap_bytes) - have_bytes) / per_s_bytes
                wait = max(wait_records, wait_bytes, 1e-3)
                break
            have_records -= records
            have_bytes -= n_bytes
            out_records += records
            out_bytes += n_bytes
            granted += 1
        if granted:
            bucket.records, bucket.bytes, bucket.spent_at = have_records, have_bytes, bucket.at
        return granted, wait

    def throttled(self, stream: str, retried: int = 0) -> None:
        """The sink retried ``retried`` entries of this stream (Kinesis refused them, or could not
        be reached): charge them, and pace lower for a while if the pace was the cause."""
        bucket = self._refill(stream)
        now = bucket.at
        if retried:
            per_s_records, _ = self._rates(bucket)
            bucket.records = max(-per_s_records, bucket.records - retried)
        if now - bucket.lowered_at < self._cooldown_s or now - bucket.spent_at > self._cooldown_s:
            return
        bucket.lowered_at = now
        bucket.factor = max(self._floor, bucket.factor * self._decrease)
        per_s_records, per_s_bytes = self._rates(bucket)
        bucket.records = min(bucket.records, per_s_records * self._burst_s)
        bucket.bytes = min(bucket.bytes, per_s_bytes * self._burst_s)

    def factor(self, stream: str) -> float:
        return self._refill(stream).factor

    def forget(self, keep: set[str]) -> None:
        """Drop the buckets of streams no longer spooled for (bounded memory over reloads)."""
        for stream in list(self._buckets):
            if stream not in keep:
                del self._buckets[stream]

    # -- helpers -------------------------------------------------------------------------------

    def _bucket(self, stream: str) -> _Bucket:
        bucket = self._buckets.get(stream)
        if bucket is None:
            # Start with a full bucket: the first batch goes at once.
            bucket = _Bucket(shards=0, records=self._records_per_shard * self._burst_s,
                             bytes=self._bytes_per_shard * self._burst_s, at=self._clock())
            self._buckets[stream] = bucket
        return bucket

    def _rates(self, bucket: _Bucket) -> tuple[float, float]:
        shards = max(1, bucket.shards) * bucket.factor * self._headroom
        return shards * self._records_per_shard, shards * self._bytes_per_shard

    def _refill(self, stream: str) -> _Bucket:
        bucket = self._bucket(stream)
        now = self._clock()
        elapsed = max(0.0, now - bucket.at)
        recovering = now - max(bucket.at, bucket.lowered_at + self._cooldown_s)   # time since the cooldown ended
        bucket.at = now
        if bucket.factor < 1.0 and recovering > 0:
            bucket.factor = min(1.0, bucket.factor + recovering / self._recover_s)
        per_s_records, per_s_bytes = self._rates(bucket)
        bucket.records = min(per_s_records * self._burst_s, bucket.records + elapsed * per_s_records)
        bucket.bytes = min(per_s_bytes * self._burst_s, bucket.bytes + elapsed * per_s_bytes)
        return bucket
