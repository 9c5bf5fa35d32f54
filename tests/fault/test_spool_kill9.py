"""kill -9 of the gateway at seeded random moments across outage, recovery and drain, spool on.

What must hold: a PUBACK leaves only once the spool's commit is durable, and a record leaves the
spool only once Kinesis holds it; so wherever SIGKILL lands (mid-commit, mid-PutRecords, between
Kinesis' answer and the spool's delete) every message the broker acknowledged to the publisher
ends up in Kinesis: 0 lost. Duplicates are what was sent but not yet deleted from the spool, or
received but not yet committed (the broker redelivers it), at the moment of death; they are
counted and printed, not failed on. The endpoint throttles its one shard like Kinesis (1,000
records/s), so a drain lasts long enough to be killed in. The seed is printed (FAULT_SEED replays).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.fault.helpers import SEED
from tests.fault.spool_rig import SpoolRig, publish_until, wait_alive
from tests.support.oracle import emit, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.integration]

RATE = 200.0
KILLS = 20
OUTAGE_S = 10.0


def test_sigkill_across_outage_recovery_and_drain_loses_nothing(
        make_spool_rig: Callable[..., SpoolRig], report, rng: random.Random) -> None:
    rig = make_spool_rig(shards=1, throttle=True)
    gw = rig.gateway()
    pub = rig.publisher()
    stop = threading.Event()                          # the feeder publishes until the kills are done
    feeder = publish_until(pub, stop, 0, RATE)
    phases: Counter[str] = Counter()
    points: list[tuple[str, float]] = []
    t0 = time.monotonic()

    def kill(phase: str) -> None:
        points.append((phase, round(time.monotonic() - t0, 2)))
        phases[phase] += 1
        gw.kill()
        gw.start()
        wait_alive(gw)

    while sum(phases.values()) < KILLS and time.monotonic() - t0 < 200:
        rig.proxy.cut()
        end = time.monotonic() + OUTAGE_S
        while time.monotonic() + 1.0 < end:
            time.sleep(rng.uniform(0.5, 3.0))
            kill("outage")
        time.sleep(max(0.0, end - time.monotonic()))
        rig.proxy.heal()
        time.sleep(rng.uniform(0.0, 1.0))
        kill("recovery")
        if wait_until(lambda: gw.metric("spool_records") > 500, 5, poll_s=0.1):
            time.sleep(rng.uniform(0.2, 1.2))
            if gw.metric("spool_records") > 0:
                kill("drain")
        wait_until(lambda: gw.metric("spool_records") < 50, 30, poll_s=0.2)
    stop.set()
    feeder.join(10)
    elapsed = time.monotonic() - t0
    assert pub.wait_acked(60), f"{len(pub.unacked)} publishes never PUBACKed"
    records = rig.wait_delivered(set(pub.acked), 120)
    kills = sum(phases.values())
    rep = report(pub.acked, records, sent=len(pub.sent), kills=kills, outage_kills=phases["outage"],
                 recovery_kills=phases["recovery"], drain_kills=phases["drain"], elapsed_s=round(elapsed, 1))
    emit("spool-kill9", f"FAULT_SEED={SEED}: {kills} SIGKILLs {dict(phases)} at {points}; "
                        f"lost={len(rep.lost)} duplicates={rep.duplicates}")
    rep.assert_no_loss()
    assert kills >= KILLS and all(phases[p] for p in ("outage", "recovery", "drain")), dict(phases)
