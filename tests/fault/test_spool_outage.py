"""Kinesis unreachable for minutes at 200 msg/s QoS 1, with the spool on (docs/spool.md).

What must hold: the gateway acknowledges each message once it is durably in the spool, so the
broker's small queue (stock Mosquitto: 1,000 messages, then silent drops) never fills; every
message the publisher had PUBACKed is in Kinesis after the uplink returns, 0 lost; the backlog is on
disk, so the gateway's RSS stays flat however long the outage; the drain's rate and duration are
printed. CI runs a 60 s outage; the 10-minute one is marked `long` (`pytest -m long`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.fault.spool_rig import RssSampler, SpoolRig
from tests.support.oracle import emit, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.integration]

RATE = 200.0
RSS_GROWTH_MB = 30.0


@pytest.mark.parametrize("outage_s", [60, pytest.param(600, marks=[pytest.mark.long, pytest.mark.timeout(1500)])])
def test_outage_loses_nothing_the_broker_acked_and_keeps_rss_flat(
        make_spool_rig: Callable[..., SpoolRig], report, outage_s: int) -> None:
    rig = make_spool_rig()
    gw = rig.gateway()
    pub = rig.publisher()
    pub.publish_range(range(200), rate=RATE)           # warm: the flow works before the outage
    assert pub.wait_acked(30) and rig.wait_delivered(set(pub.acked), 30)
    time.sleep(2)
    with RssSampler(gw) as rss:
        rig.proxy.cut()
        t_cut = time.monotonic()
        n = int(outage_s * RATE)
        pub.publish_range(range(200, 200 + n), rate=RATE)
        acked_in_outage = pub.wait_acked(30)
        spooled = gw.metric("spool_records")
        outage = time.monotonic() - t_cut
        rig.proxy.heal()
        t_heal = time.monotonic()
        drained = wait_until(lambda: gw.metric("spool_records") == 0, max(120.0, n / 200), poll_s=0.2)
        drain_s = time.monotonic() - t_heal
    records = rig.wait_delivered(set(pub.acked), 60)
    rate = spooled / drain_s if drain_s else 0.0
    rep = report(pub.acked, records, sent=len(pub.sent), outage_s=round(outage, 1), spooled=int(spooled),
                 drain_s=round(drain_s, 1), drain_rate_per_s=round(rate), rss_growth_mb=round(rss.growth_mb, 1),
                 rss_first_mb=round(rss.samples[0], 1), rss_max_mb=round(max(rss.samples), 1))
    emit("spool-outage", f"outage {outage:.0f}s at {RATE:.0f} msg/s: spooled {spooled:.0f}, drained in "
                         f"{drain_s:.1f}s ({rate:.0f} records/s), RSS growth {rss.growth_mb:.1f} MB")
    rep.assert_no_loss()
    assert acked_in_outage, f"{len(pub.unacked)} publishes never PUBACKed by the broker during the outage"
    assert len(pub.acked) == len(pub.sent), "the broker refused publishes"
    assert drained, f"spool still holds {gw.metric('spool_records'):.0f} records"
    assert spooled >= 0.9 * n, f"only {spooled:.0f} of {n} spooled during the outage"
    assert not rig.broker.dropped_messages_logged(), "the broker's queue overflowed: the gateway stopped acking"
    assert rss.growth_mb < RSS_GROWTH_MB, f"RSS grew {rss.growth_mb:.1f} MB: {rss.samples}"
