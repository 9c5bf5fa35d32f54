"""The MQTT network thread dies: the process must notice and exit for a restart.

There is no external way to kill one thread of a subprocess, and the gateway has no debug hook to
inject a fault, so the first half runs the real `Gateway` in this process: a message on a poison
topic raises a BaseException in the intake, which the source's callback guard (it catches
Exception, like paho's) lets through, and paho's loop thread dies, as
docs/delivery.md#callbacks-never-block-or-raise describes. `run_until_stopped` must see `alive()` turn False and return the failure exit code. The second
half is the supervisor's restart: a gateway process with the same client id gets the message that
was never acknowledged, so nothing is lost.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from gateway.app import EXIT_FAILED, Gateway
from gateway.routefile.loader import load_routes
from gateway.settings.settings import load_settings
from tests.fault.helpers import BASE_ENV, Rig
from tests.support.services import FAKE_AWS_ENV, HOST

pytestmark = [pytest.mark.fault, pytest.mark.integration]


class LoopKiller(BaseException):
    """Not an Exception: what escapes every `except Exception` guard."""


def test_dead_network_thread_exits_the_process_and_a_restart_loses_nothing(
        rig: Rig, report, mosquitto: Any) -> None:
    env = {**FAKE_AWS_ENV, **BASE_ENV, "MQTT_HOST": HOST, "MQTT_PORT": str(mosquitto.port),
           "MQTT_CLIENT_ID": "gw-test", "AWS_ENDPOINT_URL_KINESIS": rig.proxy.url,
           "HTTP_PORT": "0", "LOG_FORMAT": "text", "GATEWAY_ROUTES": str(rig.routes),
           "GATEWAY_RELOAD": "off"}
    saved_env = dict(os.environ)
    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    pub = rig.publisher()
    try:
        os.environ.update(env)   # boto3 reads its credentials and endpoint from the real environment
        settings = load_settings(env, env_file=None)
        table = load_routes(settings.routes_file).table
        assert table is not None
        gw = Gateway(settings, table)
        real_intake = gw.pipeline.intake
        poisoned = threading.Event()

        def intake(message: Any, mid: int, qos: int) -> None:
            if message.topic.endswith("/poison"):
                poisoned.set()
                raise LoopKiller("injected into the MQTT network thread")
            real_intake(message, mid, qos)

        gw.pipeline.intake = intake  # type: ignore[method-assign]
        safety = threading.Timer(60, gw._request_stop, args=(signal.SIGTERM, None))
        safety.daemon = True
        died_at: list[float] = []

        def publish() -> None:
            assert gw.source.wait_subscribed(20)
            pub.publish_range(range(100))
            assert pub.wait_acked(20)
            rig.wait_delivered(pub.acked, timeout=20)
            pub.topic = "fault/welder/poison"
            pub.publish(100)
            poisoned.wait(20)
            died_at.append(time.monotonic())
            pub.topic = "fault/welder/1"
            pub.publish_range(range(101, 300))

        feeder = threading.Thread(target=publish, daemon=True)
        safety.start()
        feeder.start()
        rc = gw.run_until_stopped()
        exited_after = time.monotonic() - died_at[0] if died_at else float("nan")
        safety.cancel()
        feeder.join(30)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
    assert pub.wait_acked(30)
    assert rc == EXIT_FAILED, "the gateway kept running with a dead network thread"
    assert exited_after < float(BASE_ENV["GATEWAY_SHUTDOWN_TIMEOUT_S"]) + 2
    restarted = rig.gateway()               # the supervisor's restart, same client id
    records = rig.wait_delivered(pub.acked, timeout=60)
    rep = report(pub.acked, records, sent=len(pub.sent), exit_code=rc,
                 exited_after_s=round(exited_after, 2))
    rep.assert_no_loss()
    assert restarted.alive
