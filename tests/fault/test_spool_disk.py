"""The spool's disk fills up, or its directory is read-only (docs/spool.md#full-disk-and-read-only).

What must hold: neither crashes the gateway nor corrupts the spool; the gateway behaves as
`block` (it stops acknowledging, so the broker keeps the rest), /readyz answers 503 with a problem
that names the spool, liveness stays 200 (a restart would not give back the space), and once space
returns (or the volume is writable) it commits, acknowledges and delivers on its own: 0 lost.
The spool lives on a tmpfs the test mounts (the suite runs as root) and unmounts afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fault.helpers import log_messages
from tests.fault.spool_rig import SpoolRig, fill, readiness, remount, spool_problem, tmpfs
from tests.support.oracle import emit, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.integration]

BEHIND_BROKER = 500   # published while blocked: below the broker's 1,000-message queue


def _pubacks(rig: SpoolRig) -> int:
    return rig.broker.pubacks_from("gw-test")


def _blocked_then_recovers(rig: SpoolRig, gw, pub, restore: Callable[[], None], report, case: str) -> None:
    """Publish while the spool cannot be written: no ack, 503 naming the spool, alive; restore; all delivered."""
    before = _pubacks(rig)
    pub.publish_range(range(10_000, 10_000 + BEHIND_BROKER), rate=200)
    assert wait_until(lambda: spool_problem(gw) is not None, 30), f"readiness: {readiness(gw)}"
    problem = spool_problem(gw)
    time.sleep(3)
    held = _pubacks(rig)
    time.sleep(2)
    assert _pubacks(rig) == held, "the gateway kept acknowledging while its spool could not be written"
    assert held - before < BEHIND_BROKER, "every blocked message was acknowledged"
    assert gw.alive and gw.http_get("/healthz")[0] == 200
    assert gw.metric("spool_unavailable") == 1
    restore()
    assert wait_until(lambda: gw.http_get("/readyz")[0] == 200, 60), f"not ready again: {readiness(gw)}"
    assert pub.wait_acked(30)
    records = rig.wait_delivered(set(pub.acked), 60)
    rep = report(pub.acked, records, sent=len(pub.sent), acked_while_blocked=held - before)
    emit(f"spool-{case}", f"readiness while blocked: 503 {problem!r}; acked while blocked {held - before} "
                          f"of {BEHIND_BROKER}; {rep}")
    rep.assert_no_loss()
    assert gw.alive and gw.metric("spool_unavailable") == 0
    assert not [m for m in log_messages(gw) if "Traceback" in m]


def test_disk_full_blocks_says_so_and_recovers_when_space_returns(
        make_spool_rig: Callable[..., SpoolRig], report, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "spoolfs", "8m") as mnt:
        rig = make_spool_rig(spool_dir=mnt / "spool")
        gw = rig.gateway(GATEWAY_SPOOL_MAX_BYTES=str(512 * 1024 * 1024))  # the disk, not the cap, runs out
        try:
            pub = rig.publisher()
            pub.publish_range(range(100), rate=200)
            assert pub.wait_acked(30) and rig.wait_delivered(set(pub.acked), 30)
            rig.proxy.cut()                      # records stay in the spool, so it must grow
            filler = mnt / "filler"
            filled = fill(filler)
            print(f"\n[spool-disk-full] filled {filled} bytes of the 8 MiB tmpfs")

            def restore() -> None:
                filler.unlink()
                rig.proxy.heal()

            _blocked_then_recovers(rig, gw, pub, restore, report, "disk-full")
            lines = [m for m in log_messages(gw) if "spool" in m.lower() and ("full" in m.lower() or "space" in m.lower())]
            assert lines, "no log line says the spool's disk is full"
        finally:
            gw.kill()


def test_read_only_spool_directory_blocks_says_so_and_recovers_when_writable(
        make_spool_rig: Callable[..., SpoolRig], report, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "spoolfs", "16m") as mnt:
        (mnt / "spool").mkdir()
        remount(mnt, "ro")
        rig = make_spool_rig(spool_dir=mnt / "spool")
        gw = rig.gateway(ready=False)            # a read-only volume at start: up, alive, not ready
        try:
            pub = rig.publisher()
            _blocked_then_recovers(rig, gw, pub, lambda: remount(mnt, "rw"), report, "read-only")
            lines = [m for m in log_messages(gw) if "spool" in m.lower() and "read" in m.lower()]
            assert lines, "no log line says the spool's directory is read-only"
        finally:
            gw.kill()
