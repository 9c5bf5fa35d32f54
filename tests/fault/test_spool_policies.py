"""QoS 0 through the spool, and `GATEWAY_SPOOL_WHEN_FULL=drop_oldest` (docs/spool.md#modes).

QoS 0: the broker forgets a QoS 0 message once it is sent, so the spool is its only copy; a
gateway restart during an outage must lose none of what the spool holds.
drop_oldest: a full spool makes room by deleting its oldest records, so the newest survive; each
dropped record is counted in `spool_dropped_total{reason="when_full"}`, and that count is exact:
delivered + dropped = every message the gateway received, no more, no less. Records the sender had
already read and handed to the Kinesis sink when the spool filled (at most its in-flight bound)
are delivered, not dropped: the dropped ones are the oldest of the rest, in one run.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable

import pytest

from tests.fault.spool_rig import SpoolRig, wait_alive
from tests.support.oracle import check_delivery, emit, wait_until
from tests.support.publisher import WELDER

MIN_CAP = 16 * 1024 * 1024     # the smallest GATEWAY_SPOOL_MAX_BYTES the gateway accepts
IN_FLIGHT_RECORDS = 4000       # the sender's in-flight bound (rows read and handed to the Kinesis sink)
PAD = 8000                     # bytes of padding per message, so a few thousand fill the smallest cap


def _padded(seq: int) -> bytes:
    return json.dumps({**WELDER, "seq": seq, "pad": "x" * PAD}).encode()

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def _ranges(seqs: list[int]) -> str:
    out: list[str] = []
    for s in seqs:
        if out and int(out[-1].rpartition("-")[2]) == s - 1:
            out[-1] = f"{out[-1].partition('-')[0]}-{s}"
        else:
            out.append(str(s))
    return ", ".join(out)


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_qos0_restart_during_an_outage_loses_none_of_what_was_spooled(
        make_spool_rig: Callable[..., SpoolRig], report, how: str) -> None:
    rig = make_spool_rig(qos=0)
    gw = rig.gateway()
    pub = rig.publisher(qos=0)
    rig.proxy.cut()
    n = 4000
    pub.publish_range(n, rate=400)
    assert wait_until(lambda: gw.metric("spool_records") >= n, 30), \
        f"spooled {gw.metric('spool_records'):.0f} of {n} QoS 0 messages"
    spooled = int(gw.metric("spool_records"))
    if how == "sigkill":
        gw.kill()
    else:
        gw.signal(signal.SIGTERM)
        gw.wait_exit(30)
    gw.start()
    wait_alive(gw)
    rig.proxy.heal()
    sent = set(range(n))
    records = rig.wait_delivered(sent, 60)
    rep = report(sent, records, sent=n, spooled=spooled, restart=how)
    emit("spool-qos0", f"{how} during the outage: spooled {spooled}, {rep}")
    rep.assert_no_loss()


def test_drop_oldest_keeps_the_newest_and_counts_every_drop(
        make_spool_rig: Callable[..., SpoolRig], report) -> None:
    rig = make_spool_rig()
    gw = rig.gateway(GATEWAY_SPOOL_MAX_BYTES=str(MIN_CAP), GATEWAY_SPOOL_WHEN_FULL="drop_oldest")
    pub = rig.publisher(payload=_padded)
    rig.proxy.cut()
    n = 2 * MIN_CAP // PAD           # twice what the spool can hold
    pub.publish_range(n, rate=500)
    assert pub.wait_acked(30)
    assert wait_until(lambda: gw.metric("messages_received_total") >= n, 30)
    # received is counted on arrival, a drop once the append that made room is committed: the last
    # arrivals (the ones whose appends drop counted rows) may still be on their way to the spool
    held = int(gw.metric("spool_records"))
    dropped_at_heal = int(gw.metric("spool_dropped_total", reason="when_full"))
    rig.proxy.heal()
    assert wait_until(lambda: gw.metric("spool_records") == 0, 60)
    dropped = int(gw.metric("spool_dropped_total", reason="when_full"))
    records = rig.records()
    got = sorted({s for r in records for s in check_delivery(set(), [r]).extra})
    missing = sorted(set(range(n)) - set(got))
    rep = report(set(got), records, sent=n, dropped_metric=dropped, held_at_heal=held,
                 dropped_at_heal=dropped_at_heal,
                 broker_acked=len(pub.acked), missing=_ranges(missing))
    emit("spool-drop-oldest", f"{n} received, spool held {held} at heal, dropped (metric) {dropped}, "
                              f"delivered {len(got)}: {len(got)} + {dropped} = {len(got) + dropped}")
    assert dropped > 0, "the spool never filled: make the cap smaller"
    assert len(got) + dropped == n, f"delivered {len(got)} + dropped {dropped} != {n} received"
    # the oldest records already read by the sender (in flight to Kinesis, bounded) are delivered
    # anyway and not counted as dropped; what was dropped is one run of the oldest still spooled
    first, last = missing[0], missing[-1]
    assert missing == list(range(first, last + 1)), f"dropped records are not one run: {_ranges(missing)}"
    assert set(range(last + 1, n)) <= set(got), "a record newer than the dropped ones is missing"
    assert first <= IN_FLIGHT_RECORDS, f"{first} records older than the dropped ones survived"
    assert rep.duplicates == 0
