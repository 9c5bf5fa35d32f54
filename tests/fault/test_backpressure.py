"""Bursts and backlogs against a slow or absent sink (docs/delivery.md#how-the-guarantees-are-tested).

What must hold: the gateway's memory is bounded by its backlog setting, not by the burst: when the
backlog is full it stops reading, the broker keeps the messages (its queue limit raised, and the
test asserts the broker never logged a drop), and nothing is lost once Kinesis catches up.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Self

import pytest

from tests.fault.helpers import Rig, rss_mb, scale

pytestmark = [pytest.mark.fault, pytest.mark.integration]


class Sampler:
    """Samples the gateway's backlog gauge and RSS on a thread while a scenario runs."""

    def __init__(self, gw: Any, every_s: float = 0.25) -> None:
        self.gw, self.every_s = gw, every_s
        self.backlog: list[float] = []
        self.rss: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            if self.gw.alive:
                self.backlog.append(self.gw.metric("backlog_records"))
                self.rss.append(rss_mb(self.gw.pid))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def test_burst_against_a_slow_sink_stays_bounded(rig: Rig, report, mosquitto: Any) -> None:
    """#16: 10k messages in about a second while PutRecords takes 2 s; backlog capped at 2000."""
    capacity = 2000
    gw = rig.gateway(extra_env={"GATEWAY_BACKLOG": str(capacity)})
    rig.proxy.delay(2.0)
    pub = rig.publisher()
    rss_before = rss_mb(gw.pid)
    with Sampler(gw) as sample:
        t0 = time.monotonic()
        pub.publish_range(int(scale(10_000, 10_000)))
        burst_s = time.monotonic() - t0
        assert pub.wait_acked(60)
        records = rig.wait_delivered(pub.acked, timeout=180)
        drained_s = time.monotonic() - t0
    rep = report(pub.acked, records, sent=len(pub.sent), burst_s=round(burst_s, 2),
                 drained_s=round(drained_s, 1), max_backlog=max(sample.backlog, default=0),
                 rss_mb=f"{rss_before:.0f}->{max(sample.rss, default=0):.0f}")
    rep.assert_no_loss()
    assert max(sample.backlog, default=0) <= capacity + 100, "backlog above its bound"
    assert max(sample.rss, default=0) - rss_before < 60
    assert not mosquitto.dropped_messages_logged()


def test_large_backlog_on_restart_drains_without_oom(rig: Rig, report, mosquitto: Any) -> None:
    """#23: 20k (FAULT_FULL: 100k) queued in the gateway's session while it is down, then start."""
    total = int(scale(20_000, 100_000))
    gw = rig.gateway()
    assert gw.terminate() == 0
    pub = rig.publisher()
    pub.publish_range(total)
    assert pub.wait_acked(120)
    rss_samples: list[float] = []
    t0 = time.monotonic()
    gw.start().wait_ready(30)
    with Sampler(gw) as sample:
        records = rig.wait_delivered(pub.acked, timeout=scale(300, 900))
        drained_s = time.monotonic() - t0
        rss_samples = sample.rss
    rep = report(pub.acked, records, sent=len(pub.sent), drained_s=round(drained_s, 1),
                 records_per_s=round(total / drained_s), max_rss_mb=round(max(rss_samples, default=0)),
                 max_backlog=max(sample.backlog, default=0))
    rep.assert_no_loss()
    assert max(rss_samples, default=0) < 300
    assert not mosquitto.dropped_messages_logged()
