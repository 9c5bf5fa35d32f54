"""`mqtt-kinesis-gateway run`: wiring and lifecycle.

The graph is built top to bottom in the order of the data flow's return path (docs/architecture.md):
the outbound queue and the ack tracker first, then the pipeline (which builds the sink it settles
with), then the MQTT source that feeds the pipeline. Each component gets what it needs in its
constructor; nothing is wired afterwards.

Start order is outside-in (metrics and health first, then the sink, then the MQTT source) so
that no message is taken off the connection before everything downstream of it exists. Stop order
is the reverse, and it is the delivery promise on SIGTERM: stop intake, flush what Kinesis can
take before the deadline, let the acks of what it holds go out, then disconnect. Anything QoS 1
not acked by then is redelivered by the broker to the next process with this client id.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from gateway import __version__
from gateway.ops.memory import freeze_heap, memory_trimmer, refreeze_heap
from gateway.ops.metrics import Metrics
from gateway.pipeline.pipeline import Pipeline
from gateway.pipeline.ports import OnSettled
from gateway.routefile.reload import ActiveTable, Reloader, TableDiff
from gateway.routefile.watch import DirectoryWatcher, install_sighup, mount_warning
from gateway.routing.table import RouteTable
from gateway.settings.settings import MqttConfig, Settings, SettingsError, SpoolSettings
from gateway.sink.clients import RegionalClients
from gateway.sink.errors import AwsError, NoRegionError
from gateway.sink.kinesis import KinesisSink
from gateway.sink.lean import make_lean_client
from gateway.sink.shards import open_shard_count
from gateway.source.acks import AckTracker
from gateway.source.mqtt import MqttSource
from gateway.source.outbound import Outbound

if TYPE_CHECKING:   # each is imported where it is first used: sqlite3 (~1 MB) only with a spool
    from gateway.ops.http import HealthServer
    from gateway.spool.opening import LazyStore
    from gateway.spool.spooled import SpooledSink
    from gateway.spool.store import OpenReport

__all__ = ["EXIT_FAILED", "EXIT_OK", "Gateway", "StartupError"]

log = logging.getLogger("gateway")

EXIT_OK, EXIT_FAILED = 0, 1
_TRIM_EVERY_TICKS = 10   # freed heap pages go back to the system every 5 s (gateway/ops/memory.py)


class StartupError(SettingsError):
    """What keeps the gateway from starting, in one line that names the setting to change."""


def _mqtt_config(settings: Settings, table: RouteTable) -> MqttConfig:
    """The settings' MQTT config with `persistent` decided: by the route table unless set."""
    mqtt = settings.mqtt
    if mqtt.persistent is not None:
        return mqtt
    return dataclasses.replace(mqtt, persistent=any(q >= 1 for _, q in table.subscriptions))


def _kinesis_streams(table: RouteTable) -> set[str]:
    """Every stream the table writes to, dead-letter streams included."""
    return {r.stream for r in table.routes} | {
        r.dead_letter.target for r in table.routes if r.dead_letter is not None and r.dead_letter.kind == "kinesis"}


def _undelivered_fate(qos_levels: set[int]) -> str:
    """What becomes of undelivered messages at shutdown, by the QoS they were subscribed at."""
    qos1 = "the broker redelivers the QoS 1 ones to the next process with this client id"
    qos0 = "QoS 0 messages are lost (a broker never redelivers QoS 0)"
    if qos_levels == {0}:
        return qos0
    if 0 in qos_levels:
        return f"{qos1}; {qos0}"
    return qos1


def qos0_warning(table: RouteTable) -> str | None:
    """A start-up line when any route subscribes at QoS 0: such messages are not redelivered."""
    names = [r.name for r in table.routes if r.qos == 0]
    if not names:
        return None
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"route(s) {shown} subscribe at QoS 0: a message lost in a crash, a Kinesis outage past the "
            "backlog or an undelivered shutdown is not redelivered; use qos: 1 (QOS=1) for at-least-once")


class Gateway:
    """One process's gateway: source → pipeline → sink, plus reload, health and metrics."""

    def __init__(self, settings: Settings, table: RouteTable) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.metrics.declare_routes((r.name, r.stream, r.drop_codes) for r in table.routes)
        self.metrics.reload_result(True, table.digest)  # startup load; else the reload alert fires at once
        self.active = ActiveTable(table)
        self._stop = threading.Event()
        self._exit_code = EXIT_OK
        self._refreeze = False   # a reload swapped the route table: refreeze the heap (gateway.ops.memory)
        os.environ.update(settings.aws_env_overrides)
        self.outbound = Outbound()
        self.acks = AckTracker(self.outbound)
        self.spool = self._open_spool(settings.spool) if settings.spool is not None else None
        self._spool_counted = (0, 0)   # the store's (commits, undecodable) already in the metrics
        self.pipeline = Pipeline(self.active, self.acks, self.metrics, make_sink=self._sink_factory(table),
                                 outbound=self.outbound, backlog_capacity=settings.backlog,
                                 backlog_capacity_bytes=settings.backlog_bytes, echo=settings.stdout)
        self.sink = self.pipeline.sink
        self.spooled = cast("SpooledSink", self.sink) if self.spool is not None else None
        try:
            self.sink.check_streams(_kinesis_streams(table))
        except NoRegionError:
            raise StartupError("AWS_REGION: not set, and no region in the AWS profile; set AWS_REGION"
                               " (e.g. us-east-1) to the region of the streams") from None
        except AwsError as exc:
            raise StartupError(f"AWS: {' '.join(str(exc).split())[:300]}") from None
        self.metrics.before_render(self.pipeline.flush_counts)
        if self.spool is not None:
            self.metrics.declare_spool_routes([*(r.name for r in table.routes), "-"])
            self.metrics.before_render(self._spool_metrics)
        self.source = MqttSource(_mqtt_config(settings, table), hooks=self.pipeline, acks=self.acks,
                                 outbound=self.outbound, subscriptions=table.subscriptions,
                                 retain_handling=table.retain_handling, metrics=self.metrics)
        self.reloader: Reloader | None = None
        self.watcher: DirectoryWatcher | None = None
        if settings.routes_file:
            self.reloader = Reloader(settings.routes_file, self.active, on_swap=self._swapped, metrics=self.metrics)
            self.watcher = DirectoryWatcher(settings.routes_file, self.reloader.reload, mode=settings.reload.mode,
                                            debounce_s=settings.reload.debounce_s, rescan_s=settings.reload.rescan_s)
        self.http: HealthServer | None = None
        if settings.http.port:
            from gateway.ops.http import HealthServer  # noqa: PLC0415

            self.http = HealthServer(settings.http.host, settings.http.port, metrics=self.metrics,
                                     liveness=self.alive, readiness=self.readiness)

    def _open_spool(self, spool: SpoolSettings) -> LazyStore:
        """The spool of this process; one line says what was found in it (a damaged one is moved
        aside and counted). A spool that cannot be opened at all is tried again every second."""
        from gateway.spool.opening import LazyStore  # noqa: PLC0415
        from gateway.spool.store import SpoolStore  # noqa: PLC0415

        def opened(report: OpenReport) -> None:
            if report.quarantined_to is not None:
                self.metrics.spool_damaged()
                log.warning("%s", report.summary)
            else:
                log.info("%s", report.summary)

        store = LazyStore(lambda: SpoolStore.open(spool.directory, max_bytes=spool.max_bytes,
                                                  when_full=spool.when_full),
                          spool.max_bytes, on_open=opened, drops_oldest=spool.when_full == "drop_oldest")
        store.try_open()
        return store

    def _spool_metrics(self) -> None:
        spool, sink = self.spool, self.spooled
        if spool is None or sink is None:
            return
        oldest = spool.oldest_arrival_ms()
        age = max(0.0, time.time() - oldest / 1000) if oldest is not None else 0.0
        self.metrics.set_spool(spool.records, spool.bytes, spool.capacity_bytes, age, sink.spool_problem is not None)
        commits, undecodable = spool.commits, spool.undecodable
        counted_commits, counted_undecodable = self._spool_counted
        self._spool_counted = (commits, undecodable)
        self.metrics.spool_committed(commits - counted_commits)
        if undecodable > counted_undecodable:
            self.metrics.spool_dropped("-", "undecodable", undecodable - counted_undecodable)

    def _sink_factory(self, table: RouteTable) -> Callable[[OnSettled], KinesisSink[Any] | SpooledSink]:
        """How the pipeline builds its sink: one Kinesis client per region, the route table's
        aggregate routes, settlements reported to the pipeline; with a spool, the Kinesis sink
        delivers the spool's rows and the spooled sink settles records once they are on disk."""
        aws, kinesis = self.settings.aws, self.settings.kinesis
        clients = RegionalClients(
            lambda region: make_lean_client(region=region, assume_role_arn=aws.assume_role_arn,
                                            session_name=aws.session_name,
                                            max_pool_connections=kinesis.max_in_flight + 2),
            default_region=aws.region)

        aggregate = [r.name for r in table.routes if r.aggregate]

        def make(on_settled: OnSettled) -> KinesisSink[Any] | SpooledSink:
            if self.spool is None:
                return KinesisSink(clients, kinesis, on_settled=on_settled, metrics=self.metrics,
                                   aggregate_routes=aggregate)
            from gateway.spool.ports import RetryWatch  # noqa: PLC0415
            from gateway.spool.spooled import SpooledSink  # noqa: PLC0415

            spool = self.spool
            problem = None if spool.problem is None else str(spool.problem)
            sink = SpooledSink(
                spool, lambda settled, retried: KinesisSink(clients, kinesis, on_settled=settled,
                                                            metrics=RetryWatch(self.metrics, retried)),
                on_settled, self.metrics, wake=self.outbound.wake, publish=self.outbound.publish,
                shard_count=lambda stream: open_shard_count(clients.for_stream(stream), stream),
                max_in_flight_records=2 * kinesis.max_in_flight * kinesis.max_batch_records,
                name=f"spool {self.settings.spool.directory if self.settings.spool else ''}",
                initial_problem=problem)
            sink.set_aggregate_routes(aggregate)
            return sink

        return make

    # -- reload -----------------------------------------------------------------------------

    def _swapped(self, old: RouteTable, new: RouteTable, diff: TableDiff) -> None:
        """Runs on the reload worker after the swap: metrics, the sink and subscriptions follow."""
        self.metrics.declare_routes((r.name, r.stream, r.drop_codes) for r in new.routes)
        if self.spool is not None:
            self.metrics.declare_spool_routes(r.name for r in new.routes)
        self.sink.set_aggregate_routes(r.name for r in new.routes if r.aggregate)
        self.sink.check_streams(_kinesis_streams(new))
        self.source.update_subscriptions(new.subscriptions, new.retain_handling)
        self._refreeze = True   # the main loop collects what the old table left, once it is gone

    # -- health -----------------------------------------------------------------------------

    def alive(self) -> bool:
        """Liveness: our own threads run. Independent of the broker and of Kinesis on purpose."""
        return self.source.alive and self.sink.alive and (self.http is None or self.http.alive)

    def readiness(self) -> tuple[bool, dict[str, bool], dict[str, str]]:
        checks = {
            "routes_loaded": self.active.current is not None,
            "broker_connected": self.source.connected,
            "subscriptions_granted": self.source.subscriptions_granted,
            "kinesis_reachable": self.sink.healthy,
            "intake_working": not self.pipeline.intake_failing,
        }
        problems = {f"stream {stream}": why for stream, why in self.sink.stream_problems().items()}
        if self.spooled is not None:
            problem = self.spooled.spool_problem
            checks["spool_writable"] = problem is None
            if problem is not None:
                problems["spool"] = problem
        return all(checks.values()), checks, problems

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
        warning = qos0_warning(table)
        if warning:
            log.warning("%s", warning)
        if self.http is not None:
            try:
                self.http.start()
            except OSError as error:
                raise StartupError(f"HTTP_PORT: cannot listen on {self.settings.http.host}:"
                                   f"{self.settings.http.port}: {error.strerror or error} (set HTTP_PORT to"
                                   " a free port, or 0 for no HTTP listener)") from None
        self.sink.start()
        if self.watcher is not None:
            warning = mount_warning(self.settings.routes_file or "")
            if warning:
                log.warning("%s", warning)
            self.watcher.start()
            install_sighup(self.watcher)
        freeze_heap()   # what start-up built lives until exit: out of the collector's way
        release_memory, ticks = memory_trimmer(), 0
        release_memory()   # and what it freed goes back to the system now, not at the first tick
        self.source.start()
        while not self._stop.wait(0.5):
            self.pipeline.flush()
            ticks += 1
            if self._refreeze:
                self._refreeze = False
                refreeze_heap()
            if ticks % _TRIM_EVERY_TICKS == 0:
                release_memory()
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
        if self.spool is not None:
            self._spool_metrics()
            self.spool.close()
        self.outbound.close()
        if self.http is not None:
            self.http.stop()
        self.pipeline.flush(everything=True)
        if self.spooled is not None:
            self._spool_shutdown_line(drained)
        elif drained:
            log.info("stopped: everything delivered was acknowledged")
        else:
            log.warning("stopped at the deadline with %d record(s) undelivered; %s", self.pipeline.held,
                        _undelivered_fate({q for _, q in self.active.current.subscriptions}))
        return self._exit_code

    def _spool_shutdown_line(self, drained: bool) -> None:
        """What the spool keeps for the next start, and what was never spooled, in one line."""
        assert self.spooled is not None and self.spool is not None
        where = self.settings.spool.directory if self.settings.spool else "the spool"
        unspooled = self.spooled.pending_records
        lost = (f"; {unspooled} record(s) received were not yet in the spool, so not acknowledged: "
                f"{_undelivered_fate({q for _, q in self.active.current.subscriptions})}" if unspooled else "")
        if drained:
            log.info("stopped: everything received was delivered to Kinesis; the spool %s is empty", where)
        else:
            log.warning("stopped at the deadline with %d record(s) in the spool %s: they were acknowledged and are "
                        "delivered first at the next start%s", self.spool.records, where, lost)
