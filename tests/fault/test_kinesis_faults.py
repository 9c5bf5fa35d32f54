"""Kinesis breaks behind the fault proxy (docs/delivery.md#how-the-guarantees-are-tested).

What must hold: nothing is acknowledged to the broker while Kinesis does not hold the records, so
an outage, throttling or a configuration error only delays delivery; readiness tells the operator
while it lasts, liveness does not (a restart would not help); resends are bounded in rate and,
for partial failures, limited to the failed entries so they add no duplicates.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.fault.helpers import FULL, Rig, log_messages, rss_mb, scale
from tests.support.faultproxy import FaultProxy
from tests.support.oracle import wait_until
from tests.support.services import MotoServer

pytestmark = [pytest.mark.fault, pytest.mark.integration]

RATE = 10.0  # msg/s during outages, as in the long variant


def _run_fault(rig: Rig, gw: Any, *, seconds: float, rate: float = RATE,
               first_seq: int = 0) -> dict[str, Any]:
    """Publish at `rate` for `seconds` while the fault (already set) lasts; sample health."""
    pub = rig.publisher()
    written_before = rig.proxy.written()
    put_before = gw.metric("records_put_total")
    rss_before = rss_mb(gw.pid)
    feeder = pub.publish_in_background(range(first_seq, first_seq + int(seconds * rate)), rate=rate)
    ready: list[int] = []
    live: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        ready.append(gw.http_get("/readyz")[0])
        live.append(gw.http_get("/healthz")[0])
    feeder.join(10)
    return {"pub": pub, "written_during": rig.proxy.written() - written_before,
            "put_during": gw.metric("records_put_total") - put_before, "ready": ready,
            "live": live, "rss_growth_mb": rss_mb(gw.pid) - rss_before}


@pytest.mark.parametrize("kind", ["503", "refuse"])
def test_kinesis_outage_acks_nothing_then_delivers_everything(rig: Rig, report, mosquitto: Any,
                                                              kind: str) -> None:
    """#7: Kinesis down (503 / connection refused) while 10 msg/s flow, then back."""
    seconds = scale(20, 300)
    gw = rig.gateway()
    rig.proxy.down(kind)
    t0 = time.monotonic()
    seen = _run_fault(rig, gw, seconds=seconds)
    rig.proxy.pass_through()
    pub = seen["pub"]
    assert pub.wait_acked(30)
    records = rig.wait_delivered(pub.acked, timeout=60)
    recovered = time.monotonic() - t0 - seconds
    rep = report(pub.acked, records, sent=len(pub.sent), outage_s=seconds,
                 written_during=seen["written_during"], recovery_s=round(recovered, 1),
                 rss_growth_mb=round(seen["rss_growth_mb"], 1))
    rep.assert_no_loss()
    assert seen["written_during"] == 0 and seen["put_during"] == 0, "acked during the outage"
    assert 503 in seen["ready"][-3:], f"readiness during the outage: {seen['ready']}"
    assert set(seen["live"]) == {200}, f"liveness during the outage: {seen['live']}"
    assert seen["rss_growth_mb"] < 50
    assert not mosquitto.dropped_messages_logged()
    assert wait_until(lambda: gw.http_get("/readyz")[0] == 200, 30)


def test_partial_throttling_resends_only_failed_entries(rig: Rig, report, rng: Any) -> None:
    """#8: 30 % of entries fail with ProvisionedThroughputExceeded: no loss, zero duplicates."""
    seconds = scale(20, 120)
    gw = rig.gateway()
    rig.proxy.partial(0.3, seed=rng.randrange(1 << 30))
    seen = _run_fault(rig, gw, seconds=seconds, rate=200)
    rig.proxy.pass_through()
    pub = seen["pub"]
    assert pub.wait_acked(30)
    records = rig.wait_delivered(pub.acked, timeout=60)
    retried = gw.metric("records_retried_total")
    rep = report(pub.acked, records, sent=len(pub.sent), throttled_s=seconds,
                 entries_failed=rig.proxy.counts["entries:failed"], retried=retried,
                 requests=len(rig.proxy.put_requests()))
    rep.assert_no_loss()
    assert rep.duplicates == 0
    assert retried >= rig.proxy.counts["entries:failed"] > 0


@pytest.mark.parametrize("code", ["ProvisionedThroughputExceededException", "LimitExceededException",
                                  "InternalFailure", "KMSThrottlingException"])
def test_whole_request_errors_are_retried_without_a_tight_loop(rig: Rig, report, code: str) -> None:
    """#9: each retryable whole-request error for a while: no loss, request rate bounded."""
    seconds = scale(8, 60)
    gw = rig.gateway()
    rig.proxy.error(code)
    seen = _run_fault(rig, gw, seconds=seconds, rate=50)
    rate = rig.proxy.request_rate(min(seconds, 5.0))
    rig.proxy.pass_through()
    pub = seen["pub"]
    assert pub.wait_acked(30)
    records = rig.wait_delivered(pub.acked, timeout=60)
    rep = report(pub.acked, records, sent=len(pub.sent), error=code, error_s=seconds,
                 requests_per_s=round(rate, 1), written_during=seen["written_during"])
    rep.assert_no_loss()
    assert seen["written_during"] == 0
    assert rate <= 10, f"{rate:.1f} PutRecords requests/s while failing"


@pytest.mark.parametrize("code", ["AccessDeniedException", "ResourceNotFoundException",
                                  "KMSDisabledException", "KMSAccessDeniedException"])
def test_configuration_errors_hold_records_until_fixed(rig: Rig, report, code: str) -> None:
    """#10: non-retryable configuration errors: no ack, no drop, readiness false, then delivered."""
    seconds = scale(8, 120)
    gw = rig.gateway()
    rig.proxy.error(code)
    seen = _run_fault(rig, gw, seconds=seconds)
    rig.proxy.pass_through()
    pub = seen["pub"]
    assert pub.wait_acked(30)
    records = rig.wait_delivered(pub.acked, timeout=60)
    rep = report(pub.acked, records, sent=len(pub.sent), error=code, error_s=seconds,
                 ready_during=",".join(map(str, seen["ready"])))
    rep.assert_no_loss()
    assert seen["written_during"] == 0
    assert gw.metric("records_dropped_total") == 0 and gw.metric("records_failed_total") == 0
    assert 503 in seen["ready"] and seen["ready"][-1] == 503, seen["ready"]
    assert set(seen["live"]) == {200}
    assert wait_until(lambda: gw.http_get("/readyz")[0] == 200, 30)


def test_slow_kinesis_does_not_starve_the_keepalive(rig: Rig, report, mosquitto: Any) -> None:
    """#20: PutRecords latency above the keepalive: no broker-initiated disconnect."""
    keepalive, latency = (10, 30) if FULL else (5, 8)
    gw = rig.gateway(extra_env={"MQTT_KEEPALIVE_S": str(keepalive)})
    rig.proxy.delay(latency)
    seen = _run_fault(rig, gw, seconds=3 * latency, rate=50)
    rig.proxy.pass_through()
    pub = seen["pub"]
    assert pub.wait_acked(30)
    records = rig.wait_delivered(pub.acked, timeout=90)
    broker_log = mosquitto.log_text()
    rep = report(pub.acked, records, sent=len(pub.sent), keepalive_s=keepalive,
                 put_latency_s=latency)
    rep.assert_no_loss()
    timeouts = [line for line in broker_log.splitlines()
                if "exceeded timeout" in line and "gw-test" in line]
    assert not timeouts, timeouts
    assert not any(m.startswith("disconnected from MQTT broker") for m in log_messages(gw))
    assert broker_log.count("PINGREQ from gw-test") >= 2, "no pings while Kinesis was slow"


def test_expired_token_refreshes_assumed_role_without_restart(rig: Rig, report,
                                                             kinesis_endpoint: MotoServer) -> None:
    """#11: assumed role through moto's STS; ExpiredTokenException for a while; no restart, no loss.

    The clock cannot be advanced inside the gateway process (no fake-clock hook), so expiry itself
    is represented by the service's ExpiredTokenException; STS calls are counted by a second proxy
    in front of moto that only STS goes through."""
    with FaultProxy(kinesis_endpoint.url) as sts:
        gw = rig.gateway(extra_env={
            "AWS_ASSUME_ROLE_ARN": "arn:aws:iam::123456789012:role/gateway-writer",
            "KIN_SESSION_NAME": "fault-suite", "AWS_ENDPOINT_URL": sts.url})
        pid = gw.pid
        pub = rig.publisher()
        pub.publish_range(200)
        assert pub.wait_acked(30)
        rig.wait_delivered(pub.acked, timeout=30)
        sts_calls_before = sum(sts.content_types.values())
        rig.proxy.error("ExpiredTokenException")
        seen = _run_fault(rig, gw, seconds=scale(8, 60), rate=50, first_seq=10_000)
        rig.proxy.pass_through()
        pub2 = seen["pub"]
        assert pub2.wait_acked(30)
        acked = pub.acked | pub2.acked
        records = rig.wait_delivered(acked, timeout=60)
        sts_calls = sum(sts.content_types.values())
    rep = report(acked, records, sent=len(pub.sent) + len(pub2.sent), sts_calls=sts_calls,
                 sts_calls_before_fault=sts_calls_before, written_during=seen["written_during"])
    rep.assert_no_loss()
    assert seen["written_during"] == 0
    assert gw.pid == pid and gw.alive and gw.starts == 1
    assert sts_calls_before >= 1 and sts_calls <= sts_calls_before + 1, \
        f"AssumeRole calls {sts_calls_before} -> {sts_calls}"
    assert not any("NoCredentials" in m or "Unable to locate" in m for m in log_messages(gw))
