"""Retained messages as each route chooses, against real brokers (docs/route-file.md#retained-messages).

One route file holds three routes on three topic roots, one per choice of `retained`. Three
retained messages wait on each root before the gateway first starts; while it runs, one message is
published with the retain flag set (a live message: the broker forwards it with retain=0). Then the
gateway stops and starts again with the same client id, resuming its session, and one more live
message goes to each root. What each stream must hold:

* `new_subscription` (the default): the three retained messages once, and both live messages; the
  restart writes none of them again (MQTT 5: the broker is asked with Retain Handling 1; MQTT
  3.1.1: the gateway skips the copies the broker resends, and counts them);
* `always`: the three retained messages and the first live one (now retained too) again after the
  restart;
* `never`: only the live messages (MQTT 5: Retain Handling 2; MQTT 3.1.1: skipped and counted).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.brokers import BrokerUnderTest
from tests.support.gatewayproc import GatewayProcess, write_routes
from tests.support.oracle import emit, wait_until
from tests.support.publisher import Publisher
from tests.support.services import read_all

pytestmark = pytest.mark.integration

RETAINED_BROKERS = ("mosquitto-5", "mosquitto-3.1.1", "ejabberd-5", "ejabberd-3.1.1", "aedes")


@pytest.fixture(params=RETAINED_BROKERS)
def retain_broker(request: pytest.FixtureRequest) -> BrokerUnderTest:
    name = str(request.param)
    if name.startswith("mosquitto"):
        return BrokerUnderTest(name, request.getfixturevalue("mosquitto"), name.removeprefix("mosquitto-"),
                               keeps_sessions_across_restart=False)
    if name.startswith("ejabberd"):
        server = request.getfixturevalue("ejabberd")
        return BrokerUnderTest(name, server, name.removeprefix("ejabberd-"), keeps_sessions_across_restart=False,
                               window_of_one=True, username=server.username, password=server.password)
    return BrokerUnderTest(name, request.getfixturevalue("aedes"), "3.1.1", keeps_sessions_across_restart=False)


CHOICES = ("new_subscription", "always", "never")


def payload(name: str) -> bytes:
    return json.dumps({"name": name}).encode()


def names(kinesis: Any, stream: str) -> Counter[str]:
    return Counter(json.loads(r["data"])["name"] for r in read_all(kinesis, stream))


def publish(pub: Publisher, topic: str, name: str, retain: bool) -> None:
    info = pub.client.publish(topic, payload(name), qos=1, retain=retain)
    info.wait_for_publish(10)
    assert info.is_published(), f"broker did not PUBACK {topic}"


@pytest.fixture
def retained_cleanup(publisher: Callable[..., Publisher]) -> Iterator[list[tuple[Publisher, str]]]:
    """Topics whose retained message the test leaves: cleared (an empty retained payload) after it,
    since the session's ejabberd outlives the test."""
    left: list[tuple[Publisher, str]] = []
    yield left
    for pub, topic in left:
        try:
            pub.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        except (RuntimeError, ValueError):
            pass


@pytest.mark.timeout(180)
def test_each_route_takes_retained_messages_as_its_retained_option_says_across_a_resumed_session(
        tmp_path: Path, retain_broker: BrokerUnderTest, make_stream: Callable[..., str], kinesis: Any,
        gateway_process: Callable[..., GatewayProcess], publisher: Callable[..., Publisher],
        retained_cleanup: list[tuple[Publisher, str]]) -> None:
    broker, root = retain_broker, f"t{uuid.uuid4().hex[:8]}"
    streams = {choice: make_stream(suffix=f"-{i}") for i, choice in enumerate(CHOICES)}
    routes = "\n".join(f"""\
  - name: {choice.replace('_', '-')}
    topic: "{root}/{choice}/#"
    stream: {streams[choice]}
    partition_key: name
    retained: {choice}""" for choice in CHOICES)
    route_file = write_routes(tmp_path / "routes.yaml", f"version: 1\nroutes:\n{routes}\n")
    pub = publisher(**broker.publisher_kwargs())
    for choice in CHOICES:
        for i in range(3):
            publish(pub, f"{root}/{choice}/r{i}", f"r{i}", retain=True)
            retained_cleanup.append((pub, f"{root}/{choice}/r{i}"))
        retained_cleanup.append((pub, f"{root}/{choice}/live1"))

    gw = gateway_process(route_file, mqtt_port=broker.port, client_id=f"gw-{root}", extra_env=broker.gateway_env())
    for choice in CHOICES:
        publish(pub, f"{root}/{choice}/live1", "live1", retain=True)
    first = {"new_subscription": {"r0": 1, "r1": 1, "r2": 1, "live1": 1},
             "always": {"r0": 1, "r1": 1, "r2": 1, "live1": 1}, "never": {"live1": 1}}
    assert wait_until(lambda: all(names(kinesis, streams[c]) == first[c] for c in CHOICES), 60, poll_s=0.2), \
        ({c: names(kinesis, streams[c]) for c in CHOICES}, gw.output_tail())
    skipped_first = {c: gw.metric("messages_skipped_total", route=c.replace("_", "-"), reason="retained")
                     for c in CHOICES}

    gw.restart()
    resumed = [e for e in gw.logs() if "session_present=True" in str(e.get("message", e.get("raw")))]
    assert resumed, f"the restarted gateway did not resume its session\n{gw.output_tail()}"
    for choice in CHOICES:
        publish(pub, f"{root}/{choice}/live2", "live2", retain=False)
    second = {"new_subscription": {"r0": 1, "r1": 1, "r2": 1, "live1": 1, "live2": 1},
              "always": {"r0": 2, "r1": 2, "r2": 2, "live1": 2, "live2": 1}, "never": {"live1": 1, "live2": 1}}
    assert wait_until(lambda: all(names(kinesis, streams[c]) == second[c] for c in CHOICES), 60, poll_s=0.2), \
        ({c: names(kinesis, streams[c]) for c in CHOICES}, gw.output_tail())
    time.sleep(1.0)  # nothing more comes: a late resent copy would show here
    got = {c: names(kinesis, streams[c]) for c in CHOICES}
    assert all(got[c] == second[c] for c in CHOICES), got
    skipped = {c: gw.metric("messages_skipped_total", route=c.replace("_", "-"), reason="retained") for c in CHOICES}
    emit(f"retained[{broker.name}]", f"first start skipped {skipped_first}; after the restart skipped {skipped}")
    assert skipped["always"] == 0 and skipped_first["always"] == 0
    if broker.protocol == "3.1.1":  # the broker resends, the gateway skips and counts
        assert skipped_first["never"] == 3 and skipped["never"] == 4
        assert skipped_first["new_subscription"] == 0 and skipped["new_subscription"] == 4
    assert gw.alive
