"""The gateway's metrics: names, labels, no _created series, its own registry."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from gateway.model import REASON_CODES
from gateway.ops.metrics import FAILURE_CODES, METRIC_NAMES, PREFIX, Metrics
from gateway.routing.expressions import compile_expression
from gateway.routing.table import DeadLetter, Route


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def exercise(metrics: Metrics) -> None:
    metrics.messages_received("r1", 3)
    metrics.unrouted()
    metrics.records_put("r1", "s1", 500)
    metrics.records_failed("r1", "s1", "record too large")
    metrics.records_retried("s1", 7)
    metrics.records_dead_lettered("r1")
    metrics.records_dropped("r1", "dead letter failed")
    metrics.batch_sent("s1", 500, 0.12)
    metrics.delivered("r1", 0.3)
    metrics.set_backlog(10, 20000)
    metrics.set_connected(True)
    metrics.set_subscriptions_granted(True)
    metrics.session_lost()
    metrics.callback_error()
    metrics.reload_result(True, "ab" * 32, now=1700000000.0)
    metrics.spool_commit(0.002)
    metrics.spool_dropped("r1", "when_full", 3)
    metrics.spool_damaged()
    metrics.spool_committed(4)
    metrics.set_spool(5, 500, 1000, 1.5, False)


def test_metric_names_lists_exactly_the_exported_sample_names() -> None:
    metrics = Metrics()
    exercise(metrics)
    exported = {name for name, _ in samples(metrics)}
    assert exported == METRIC_NAMES
    assert all(name.startswith(PREFIX) for name in METRIC_NAMES)
    assert "mqtt_kinesis_gateway_records_put_total" in METRIC_NAMES


def test_no_created_series_are_exported() -> None:
    metrics = Metrics()
    exercise(metrics)
    assert b"_created" not in metrics.render()


def test_counters_carry_route_and_stream_labels_only() -> None:
    metrics = Metrics()
    exercise(metrics)
    metrics.records_put("r1", "s1", 2)
    got = samples(metrics)
    assert got[(PREFIX + "records_put_total", (("route", "r1"), ("stream", "s1")))] == 502
    assert got[(PREFIX + "messages_received_total", (("route", "r1"),))] == 3
    assert got[(PREFIX + "records_failed_total",
                (("reason", "record too large"), ("route", "r1"), ("stream", "s1")))] == 1
    label_names = {k for _, labels in got for k, _ in labels}
    assert label_names <= {"route", "stream", "reason", "result", "sha256", "version", "le"}


def test_batch_and_latency_histograms_observe() -> None:
    metrics = Metrics()
    metrics.batch_sent("s1", 500, 0.2)
    metrics.delivered("r1", 1.5)
    got = samples(metrics)
    assert got[(PREFIX + "batch_records_sum", (("stream", "s1"),))] == 500
    assert got[(PREFIX + "put_records_duration_seconds_count", (("stream", "s1"),))] == 1
    assert got[(PREFIX + "delivery_latency_seconds_bucket", (("le", "2.5"), ("route", "r1")))] == 1


def test_failed_reload_keeps_the_last_good_digest_and_timestamp() -> None:
    metrics = Metrics()
    metrics.reload_result(True, "aa" * 32, now=100.0)
    metrics.reload_result(False, "bb" * 32, now=200.0)
    got = samples(metrics)
    assert got[(PREFIX + "config_last_reload_successful", ())] == 0
    assert got[(PREFIX + "config_last_reload_success_timestamp_seconds", ())] == 100.0
    assert got[(PREFIX + "config_info", (("sha256", "aa" * 32),))] == 1
    assert (PREFIX + "config_info", (("sha256", "bb" * 32),)) not in got
    assert got[(PREFIX + "config_reloads_total", (("result", "failure"),))] == 1
    assert got[(PREFIX + "config_reloads_total", (("result", "success"),))] == 1


def test_disconnect_also_clears_subscriptions_granted() -> None:
    metrics = Metrics()
    metrics.set_connected(True)
    metrics.set_subscriptions_granted(True)
    metrics.set_connected(False)
    got = samples(metrics)
    assert got[(PREFIX + "mqtt_connected", ())] == 0
    assert got[(PREFIX + "subscriptions_granted", ())] == 0


def test_declared_routes_export_zero_series_before_traffic() -> None:
    metrics = Metrics()
    metrics.declare_routes([("r1", "s1", ())])
    got = samples(metrics)
    assert got[(PREFIX + "records_put_total", (("route", "r1"), ("stream", "s1")))] == 0
    assert got[(PREFIX + "messages_received_total", (("route", "r1"),))] == 0


def test_every_drop_and_failure_reason_a_route_can_have_exists_at_zero_before_the_first_event() -> None:
    metrics = Metrics()
    route = Route("r1", ("t/#",), "s1", compile_expression("name"))
    metrics.declare_routes([(route.name, route.stream, route.drop_codes)])
    got = samples(metrics)
    dropped = {dict(labels)["reason"] for (name, labels) in got if name == PREFIX + "records_dropped_total"}
    failed = {dict(labels)["reason"] for (name, labels) in got if name == PREFIX + "records_failed_total"}
    assert {"not_json", "key_missing", "too_large"} <= dropped and dropped <= REASON_CODES
    assert failed == set(FAILURE_CODES)
    assert all(got[key] == 0 for key in got if key[0] in (PREFIX + "records_dropped_total",
                                                          PREFIX + "records_failed_total"))
    with_dead_letter = Route("r2", ("t/#",), "s1", compile_expression("name"),
                             dead_letter=DeadLetter("kinesis", "dlq"))
    assert with_dead_letter.drop_codes == ("dead_letter_failed",)


def test_build_info_carries_the_version_and_the_global_registry_is_untouched() -> None:
    metrics = Metrics()
    assert samples(metrics)[(PREFIX + "build_info", (("version", __version__),))] == 1
    Metrics()  # a second instance must not clash: each has its own registry
    assert not any(m.name.startswith(PREFIX) for m in REGISTRY.collect())
