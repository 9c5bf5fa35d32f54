"""`mqtt-kinesis-gateway run`: wiring and lifecycle.

Start order is outside-in (metrics and health first, then the sink, then the MQTT source) so
that no message is taken off the connection before everything downstream of it exists. Stop order
is the reverse, and it is the delivery promise on SIGTERM: stop intake, flush what Kinesis can
take before the deadline, let the acks of what it holds go out, then disconnect. Anything not
acked by then is redelivered by the broker to the next process with this client id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any

from gateway import __version__
from gateway.routefile.reload import ActiveTable, Reloader, TableDiff
from gateway.settings.settings import Settings
from gateway.routefile.watch import DirectoryWatcher, install_sighup, mount_warning
from gateway.ops.http import HealthServer
from gateway.ops.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.routing.table import RouteTable
from gateway.sink.aws import make_kinesis_client
from gateway.sink.kinesis import KinesisSink, SinkConfig
from gateway.settings.settings import MqttConfig
from gateway.source.acks import AckTracker
from gateway.source.mqtt import MqttSource
from gateway.source.outbound import Outbound

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "Gateway"]

log = logging.getLogger("gateway")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _mqtt_config(settings: Settings, table: RouteTable) -> MqttConfig:
    """The settings' MQTT config with `persistent` decided: by the route table unless set."""
    mqtt = settings.mqtt
    if mqtt.persistent is not None:
        return mqtt
    return dataclasses.replace(mqtt, persistent=any(q >= 1 for _, q in table.subscriptions))


class Gateway:
    """One process's gateway: source → pipeline → sink, plus reload, health and metrics."""

    def __init__(self, settings: Settings, table: RouteTable) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.metrics.declare_routes((r.name, r.stream) for r in table.routes)
        self.metrics.reload_result(True, table.digest)  # startup load; else the reload alert fires at once
        self.active = ActiveTable(table)
        self._stop = threading.Event()
        self._exit_code = EXIT_OK
        os.environ.update(settings.aws_env_overrides)
        kinesis = settings.kinesis
        client = make_kinesis_client(region=kinesis.region, assume_role_arn=kinesis.assume_role_arn,
                                     session_name=kinesis.session_name,
                                     max_pool_connections=kinesis.max_in_flight + 2)
        self.sink = KinesisSink(client, SinkConfig(
            max_batch_records=kinesis.batch_records, max_batch_bytes=kinesis.batch_bytes,
            max_record_bytes=kinesis.max_record_bytes, linger_s=kinesis.linger_s,
            max_in_flight=kinesis.max_in_flight, backoff_base_s=kinesis.retry_base_s,
            backoff_cap_s=kinesis.retry_cap_s, record_ttl_s=kinesis.record_ttl_s,
            aggregate_routes=frozenset(r.name for r in table.routes if r.aggregate),
        ), on_settled=self._settled, metrics=self.metrics)
        self.outbound = Outbound()
        self.acks = AckTracker(self.outbound)
        self.pipeline = Pipeline(self.active, self.sink, self.acks, self.metrics, settings.backlog,
                                 dead_letter_mqtt=self.outbound, echo=settings.stdout, hand_over_in_bulk=True)
        self.pipeline.set_on_backlog_freed(self.outbound.wake)
        self.metrics.before_render(self.pipeline.flush_counts)
        self.source = MqttSource(_mqtt_config(settings, table), hooks=self.pipeline, acks=self.acks,
                                 outbound=self.outbound, subscriptions=table.subscriptions, metrics=self.metrics)
        self.reloader: Reloader | None = None
        self.watcher: DirectoryWatcher | None = None
        if settings.routes_file:
            self.reloader = Reloader(settings.routes_file, self.active, on_swap=self._swapped, metrics=self.metrics)
            self.watcher = DirectoryWatcher(settings.routes_file, self.reloader.reload, mode=settings.reload.mode,
                                            debounce_s=settings.reload.debounce_s, rescan_s=settings.reload.rescan_s)
        self.http = (HealthServer(settings.http.host, settings.http.port, metrics=self.metrics,
                                  liveness=self.alive, readiness=self.readiness)
                     if settings.http.port else None)

    # -- callbacks --------------------------------------------------------------------------

    def _settled(self, results: list[tuple[Any, Any]]) -> None:
        self.pipeline.settled(results)

    def _swapped(self, old: RouteTable, new: RouteTable, diff: TableDiff) -> None:
        """Runs on the reload worker after the swap: subscriptions follow the new table."""
        self.metrics.declare_routes((r.name, r.stream) for r in new.routes)
        self.sink.set_aggregate_routes(r.name for r in new.routes if r.aggregate)
        self.source.update_subscriptions(new.subscriptions)

    # -- health -----------------------------------------------------------------------------

    def alive(self) -> bool:
        """Liveness: our own threads run. Independent of the broker and of Kinesis on purpose."""
        return self.source.alive and self.sink.alive

    def readiness(self) -> tuple[bool, dict[str, bool]]:
        checks = {
            "routes_loaded": self.active.current is not None,
            "broker_connected": self.source.connected,
            "subscriptions_granted": self.source.subscriptions_granted,
            "kinesis_reachable": self.sink.healthy,
        }
        return all(checks.values()), checks

    # -- lifecycle --------------------------------------------------------------------------

    def _request_stop(self, signum: int, _frame: Any) -> None:
        log.info("received %s: draining", signal.Signals(signum).name)
        self._stop.set()

    def run_until_stopped(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        table = self.active.current
        log.info("mqtt-kinesis-gateway %s starting: %d route(s), subscriptions %s", __version__,
                 len(table.routes), ", ".join(f"{f}@{q}" for f, q in table.subscriptions))
        if self.http is not None:
            self.http.start()
        self.sink.start()
        if self.watcher is not None:
            warning = mount_warning(self.settings.routes_file or "")
            if warning:
                log.warning("%s", warning)
            self.watcher.start()
            install_sighup(self.watcher)
        self.source.start()
        while not self._stop.wait(0.5):
            self.pipeline.flush()
            if not self.alive():
                log.error("a gateway thread died; exiting so the supervisor restarts the process")
                self._exit_code = EXIT_FAILED
                break
        return self._shutdown()

    def _shutdown(self) -> int:
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        self.source.stop_intake()
        if self.watcher is not None:
            self.watcher.stop()
        drained = self.sink.drain(max(0.0, deadline - time.monotonic() - 1.0))
        self.source.stop(max(0.5, min(2.0, deadline - time.monotonic())))
        self.sink.close()
        if self.http is not None:
            self.http.stop()
        self.pipeline.flush(everything=True)
        if drained:
            log.info("stopped: everything delivered was acknowledged")
        else:
            log.warning("stopped at the deadline with %d record(s) undelivered; the broker redelivers "
                        "their messages to the next process with this client id", self.pipeline.held)
        return self._exit_code
