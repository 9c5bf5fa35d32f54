"""The gateway process dies or is stopped mid-stream (docs/delivery.md#how-the-guarantees-are-tested).

What must hold: a PUBACK leaves the gateway only after Kinesis holds the record, and the broker
session (persistent, fixed client id, Clean Start 0) outlives the process. So whatever instant the
process dies at, every message the broker accepted reaches Kinesis once the gateway is back;
duplicates are what was written but not yet acknowledged at the moment of death.
"""

from __future__ import annotations

import random
import signal
import time
from collections import defaultdict

import pytest

from tests.fault.helpers import FULL, Rig, scale
from tests.support.oracle import seqs_in, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.integration]

RECEIVE_MAXIMUM = 200
BATCH = 500


def test_sigkill_at_random_points_loses_nothing(rig: Rig, report, rng: random.Random) -> None:
    """#1: ≥ 10 seeded SIGKILLs while a stream flows; duplicates ≤ kills × (window + batch)."""
    total = int(scale(10_000, 50_000))
    kills = int(scale(10, 20))
    rate = scale(350, 700)
    gw = rig.gateway(extra_env={"MQTT_RECEIVE_MAXIMUM": str(RECEIVE_MAXIMUM)})
    pub = rig.publisher()
    started = time.monotonic()
    feeder = pub.publish_in_background(total, rate=rate)
    points: list[float] = []
    for _ in range(kills):
        time.sleep(rng.uniform(0.3, 1.6))
        points.append(round(time.monotonic() - started, 2))
        gw.kill()
        gw.start().wait_ready(30)
    print(f"[fault] SIGKILL points (s after start): {points}")
    feeder.join(timeout=total / rate + 60)
    assert pub.wait_acked(60), "the broker did not acknowledge every publish"
    records = rig.wait_delivered(pub.acked, timeout=120)
    rep = report(pub.acked, records, sent=len(pub.sent), kills=len(points), starts=gw.starts,
                 elapsed_s=round(time.monotonic() - started, 1))
    rep.assert_no_loss()
    assert len(points) >= 10
    bound = len(points) * (RECEIVE_MAXIMUM + BATCH)
    assert rep.duplicates <= bound, f"{rep.duplicates} duplicates, bound {bound}"


def test_sigkill_after_putrecords_succeeded_before_puback(rig: Rig, report) -> None:
    """#2: Kinesis holds the records but the response never reaches the gateway before SIGKILL.

    The broker redelivers; the second copies carry the same seq (the dedup id) byte for byte."""
    gw = rig.gateway()
    rig.proxy.stall(60)                     # write at once, answer a minute later
    pub = rig.publisher()
    pub.publish_range(300)
    assert pub.wait_acked(30)
    assert wait_until(lambda: len(rig.proxy.written_seqs()) >= 300, 30), \
        f"only {len(rig.proxy.written_seqs())} written"
    gw.kill()
    rig.proxy.pass_through()
    gw.start().wait_ready(30)
    records = rig.wait_delivered(pub.acked, timeout=60)
    time.sleep(2)  # let the redelivered copies land too
    records = rig.records()
    rep = report(pub.acked, records, sent=len(pub.sent))
    rep.assert_no_loss()
    copies: dict[int, set[bytes]] = defaultdict(set)
    counts: dict[int, int] = defaultdict(int)
    for r in records:
        for seq in seqs_in(r["data"]):
            copies[seq].add(bytes(r["data"]))
            counts[seq] += 1
    duplicated = [s for s, n in counts.items() if n > 1]
    assert duplicated, "the stalled batch was written, so its redelivery must duplicate"
    assert all(len(copies[s]) == 1 for s in duplicated), "a redelivered copy differs from the first"


@pytest.mark.parametrize("at_s", [1.0, 3.0])
def test_sigterm_drains_before_the_grace_period(rig: Rig, report, at_s: float) -> None:
    """#3: SIGTERM mid-stream: exit 0 within GATEWAY_SHUTDOWN_TIMEOUT_S; nothing lost after restart."""
    grace = 10.0
    gw = rig.gateway(extra_env={"GATEWAY_SHUTDOWN_TIMEOUT_S": str(grace)})
    rig.proxy.delay(0.3)                    # keep records in flight when the signal lands
    pub = rig.publisher()
    feeder = pub.publish_in_background(3000, rate=600)
    time.sleep(at_s)
    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    rc = gw.wait_exit(grace + 5)
    took = time.monotonic() - t0
    feeder.join(30)
    assert pub.wait_acked(30)
    rig.proxy.pass_through()
    gw.start().wait_ready(30)
    records = rig.wait_delivered(pub.acked, timeout=60)
    rep = report(pub.acked, records, sent=len(pub.sent), exit_code=rc, stop_s=round(took, 2))
    assert rc == 0, gw.output_tail()
    assert took < grace, f"took {took:.1f}s to stop, grace {grace}s"
    rep.assert_no_loss()


def test_restart_keeps_the_v5_session(rig: Rig, report) -> None:
    """#4: stop, publish 1000, start: session_present=True and all 1000 delivered."""
    gw = rig.gateway()
    assert gw.terminate() == 0
    pub = rig.publisher()
    pub.publish_range(1000)
    assert pub.wait_acked(30)
    gw.start().wait_ready(30)
    records = rig.wait_delivered(pub.acked, timeout=60)
    rep = report(pub.acked, records, sent=len(pub.sent))
    rep.assert_no_loss()
    connects = [e.get("message", e.get("msg", "")) for e in gw.logs()
                if "session_present" in str(e.get("message", e.get("msg", "")))]
    assert connects and connects[-1].endswith("session_present=True)"), connects
    assert gw.metric("mqtt_sessions_lost_total") == 0
    assert not FULL or rep.duplicates == 0
