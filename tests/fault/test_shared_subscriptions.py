"""Two replicas on one shared subscription; one dies (docs/delivery.md#how-the-guarantees-are-tested).

mosquitto 2.0 keeps a dead member's unacked messages in its session and even keeps assigning new
ones to it (docs/delivery.md#shared-subscriptions), so no loss needs a persistent session under a stable client id:
the member's share arrives when it comes back with the same id.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.fault.helpers import Rig, scale

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def test_shared_member_killed_and_restarted_loses_nothing(rig: Rig, report,
                                                          rng: random.Random) -> None:
    total = int(scale(3000, 20_000))
    env = {"MQTT_SHARE_GROUP": "fault"}
    a = rig.gateway(client_id="gw-a", extra_env=env)
    b = rig.gateway(client_id="gw-b", extra_env=env)
    pub = rig.publisher()
    feeder = pub.publish_in_background(total, rate=400)
    time.sleep(rng.uniform(1.0, 3.0))
    a.kill()
    down_s = rng.uniform(2.0, 4.0)
    time.sleep(down_s)
    a.start().wait_ready(30)
    feeder.join(total / 400 + 30)
    assert pub.wait_acked(30)
    records = rig.wait_delivered(pub.acked, timeout=90)
    put_a, put_b = a.metric("records_put_total"), b.metric("records_put_total")
    rep = report(pub.acked, records, sent=len(pub.sent), member_down_s=round(down_s, 1),
                 put_by_a_after_restart=put_a, put_by_b=put_b)
    rep.assert_no_loss()
    assert put_b > 0 and put_a > 0, "both members must have taken a share"
    assert a.alive and b.alive
