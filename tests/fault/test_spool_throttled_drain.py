"""After an outage, the spool drains into a stream that throttles like Kinesis (docs/spool.md#drain-pacing).

The endpoint (bench/endpoint.py, `--throttle`) gives each of the stream's 2 shards 1,000 records/s
and refuses entries beyond that with a per-entry ProvisionedThroughputExceeded, as Kinesis does.
What must hold: the drain uses ≥ 80 % of the shards' capacity (pacing from the shard map, not a
timid fixed rate) and ≤ 5 % of the entries it sends are throttled (pacing, not a storm of
retries); new messages keep being acknowledged while the backlog drains; 0 lost.

Capacity used is counted without the endpoint's initial allowance (each shard's bucket starts
full, one second's worth): (accepted − shards × 1,000) ÷ (shards × 1,000 × drain seconds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from bench.endpoint import SHARD_RECORDS_PER_S
from tests.fault.spool_rig import SpoolRig, publish_until
from tests.support.oracle import emit, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.integration]

SHARDS = 2
BACKLOG = 24_000           # 12 s of the two shards' capacity
LIVE_RATE = 100.0          # published during the drain


def test_drain_fills_the_shards_capacity_without_a_throttling_storm(
        make_spool_rig: Callable[..., SpoolRig], report) -> None:
    rig = make_spool_rig(shards=SHARDS, throttle=True)
    gw = rig.gateway()
    pub = rig.publisher()
    # the gateway ran before the outage, so it knows the stream's shards (a lookup that fails
    # during an outage is retried every few seconds, and until then one shard is assumed)
    pub.publish_range(range(-100, 0), rate=200)
    assert pub.wait_acked(30) and rig.wait_delivered(set(pub.acked), 30)
    rig.proxy.cut()
    pub.publish_range(BACKLOG, rate=1500)
    assert pub.wait_acked(60), f"{len(pub.unacked)} not PUBACKed during the outage"
    assert wait_until(lambda: gw.metric("spool_records") >= BACKLOG, 30), gw.metric("spool_records")
    time.sleep(1)
    rig.endpoint.set_throttle(rig.stream)     # fresh counters and full buckets from here
    acked_before = len(pub.acked)
    rig.proxy.heal()
    t_heal = time.monotonic()
    stop = threading.Event()
    live = publish_until(pub, stop, BACKLOG, LIVE_RATE)
    timeline: list[str] = []
    last = {"sent": 0, "accepted": 0, "throttled": 0}

    def progress() -> bool:
        now = rig.endpoint.throttle_stats(rig.stream)
        timeline.append(f"{time.monotonic() - t_heal:.1f}s +{now['accepted'] - last['accepted']}"
                        f"/-{now['throttled'] - last['throttled']}")
        last.update(now)
        return gw.metric("spool_records") < LIVE_RATE

    drained = wait_until(progress, 120, poll_s=0.5)
    drain_s = time.monotonic() - t_heal
    print("\n[spool-throttled-drain] accepted/throttled per 0.5 s: " + " ".join(timeline))
    stats = rig.endpoint.throttle_stats(rig.stream)
    acked_during = len(pub.acked) - acked_before
    stop.set()
    live.join(10)
    span_s = (stats["last_accept_ns"] - stats["first_accept_ns"]) / 1e9
    capacity = SHARDS * SHARD_RECORDS_PER_S
    used = (stats["accepted"] - capacity) / (capacity * span_s) if span_s > 0 else 0.0
    used_raw = stats["accepted"] / (capacity * span_s) if span_s > 0 else 0.0
    throttled = stats["throttled"] / stats["sent"] if stats["sent"] else 0.0
    emit("spool-throttled-drain",
         f"{SHARDS} shards, backlog {BACKLOG}: drained in {drain_s:.1f}s (accepting {span_s:.1f}s), "
         f"sent {stats['sent']} accepted {stats['accepted']} throttled {stats['throttled']} "
         f"({100 * throttled:.2f} %), capacity used {100 * used:.1f} % ({100 * used_raw:.1f} % counting the "
         f"initial allowance), {stats['accepted'] / span_s if span_s else 0:.0f} records/s; "
         f"{acked_during} new messages acknowledged during the drain")
    assert drained, f"spool still holds {gw.metric('spool_records'):.0f}"
    assert acked_during > 0.5 * LIVE_RATE * drain_s, "new messages were not acknowledged while draining"
    assert used >= 0.80, f"drain used {100 * used:.1f} % of the shards' capacity"
    assert throttled <= 0.05, f"{100 * throttled:.2f} % of the entries sent were throttled"
    assert pub.wait_acked(30)
    rep = report(pub.acked, rig.wait_delivered(set(pub.acked), 60), sent=len(pub.sent), capacity_used_pct=round(100 * used, 1),
                 throttled_pct=round(100 * throttled, 2), drain_s=round(drain_s, 1))
    rep.assert_no_loss()
