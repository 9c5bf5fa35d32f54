"""The scenarios of the benchmark: subjects, route files and the target each one is judged against.

Every scenario returns rows (one per subject) and checks (target, measured, pass). Ratios are
always taken between rows of the same bench invocation, on the same machine state.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.measure import MB, Monitor
from bench.runner import ROOT, Subject, run_group
from bench.services import Endpoint, free_port
from bench.subject import External, burst_checks, steady_checks
from bench.subject import subject as external

STREAM = "bench-stream"
NAIVE_STREAM = "bench-naive"
SPOOL_OFF_STREAM, SPOOL_STREAM = "bench-g-off", "bench-g-on"
# (g) streams of this many shards: with the spool on, the sender paces to the shards' capacity
# (1,000 records/s each), as it must against real Kinesis; the bench endpoint never throttles, so
# one shard would measure the pacer's limit, not the spool's cost. Both streams get the same count.
SPOOL_SHARDS = 64
FILTER = "bench/+/welder/#"
PY = sys.executable
Row = dict[str, Any]
Rows = list[Row]
Checks = list[Row]
GATEWAY_ENV: dict[str, str] = {}  # --gateway-env overrides, applied to every gateway run


@dataclass(frozen=True)
class Sizes:
    steady_rate: float = 100.0
    steady_s: float = 60.0
    burst: int = 100_000
    naive_cap_s: float = 20.0
    subject_cap_s: float = 60.0  # a --subject in a burst, so a slow bridge cannot stretch the run
    extra_routes: int = 10_000
    small_backlog: int = 2000
    repeat: int = 1

    @classmethod
    def quick(cls) -> Sizes:
        return cls(steady_s=10.0, burst=20_000, naive_cap_s=5.0, subject_cap_s=15.0, extra_routes=10_000)


def route_file(path: Path, *, qos: int, extra_routes: int = 0, aggregate: bool = False,
               stream: str = STREAM) -> Path:
    """The bench route: welder payload, key `name`, newline-terminated; plus non-matching routes."""
    lines = ["version: 1", "routes:",
             "  - name: welder", f"    topic: \"{FILTER}\"", f"    stream: {stream}",
             "    partition_key: name", f"    qos: {qos}", "    append_newline: true"]
    if aggregate:
        lines.append("    aggregate: true")
    for i in range(extra_routes):
        lines += [f"  - name: r{i}", f"    topic: \"bench/r{i}/+/welder/#\"", f"    stream: {STREAM}",
                  "    partition_key: name", f"    qos: {qos}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def gateway(name: str, routes: Path, *, workers: int = 1, aggregated: bool = False,
            env: dict[str, str] | None = None, info: dict[str, Any] | None = None,
            stream: str = STREAM, probe: Callable[[], dict[str, float]] | None = None) -> Subject:
    cmd = os.environ.get("BENCH_GATEWAY_COMMAND")
    argv = (shlex.split(cmd) if cmd else [PY, "-m", "gateway"]) + ["run", "--routes", str(routes)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    e = {"MQTT_CLIENT_ID": f"bench-{name}-{time.monotonic_ns()}", "HTTP_PORT": "0", "LOG_FORMAT": "json",
         "GATEWAY_ROUTES": str(routes),
         "GATEWAY_RELOAD": "off"}
    if workers > 1:
        e["MQTT_SHARE_GROUP"] = "bench"
    e.update(GATEWAY_ENV)
    e.update(env or {})
    return Subject(name, argv, e, stream=stream, aggregated=aggregated,
                   min_subscribers=workers if workers > 1 else 0, probe=probe,
                   info={"kind": "gateway", "workers": workers, **(info or {})})


def naive(qos: int, cap_s: float | None) -> Subject:
    return Subject("naive", [PY, "bench/baselines/naive_bridge.py", "--port", "{port}", "--topic", FILTER,
                             "--qos", str(qos), "--stream", NAIVE_STREAM],
                   stream=NAIVE_STREAM, ready_line=True, cap_s=cap_s, info={"kind": "naive bridge"})


def bare(qos: int, expect: int, fast_path: bool = False) -> Subject:
    argv = [PY, "bench/baselines/bare_receive.py", "--port", "{port}", "--topic", FILTER,
            "--qos", str(qos), "--expect", str(expect), "--idle-s", "5"]
    kind = "paho bare receive"
    if fast_path:
        argv.append("--fast-path")
        kind += " + the gateway's paho fast path"
    return Subject("bare-fast" if fast_path else "bare", argv,
                   info={"kind": kind, "protocol": "5", "receive_maximum": 1000})


def bare_shared(qos: int, members: int) -> list[Subject]:
    """`members` bare receivers in one shared-subscription group: the broker's ceiling for workers."""
    return [Subject(f"bare-share{i}", [PY, "bench/baselines/bare_receive.py", "--port", "{port}",
                                       "--topic", f"$share/bare/{FILTER}", "--qos", str(qos),
                                       "--client-id", f"bare-share-{i}", "--idle-s", "2"],
                    info={"kind": f"paho bare receive ×{members}, one share group"})
            for i in range(members)]


def _combined(rows: list[Row]) -> Row:
    """Several receivers of one load as one subject: messages summed, span the longest."""
    delivered = sum(r["delivered"] for r in rows)
    span = max(r["span_s"] or 0 for r in rows)
    cpu = sum(r["cpu_s"] for r in rows)
    return {**rows[0], "subject": "bare-share", "delivered": delivered, "lost": rows[0]["count"] - delivered,
            "span_s": span, "msg_per_s": delivered / span if span else 0.0, "cpu_s": cpu,
            "cpu_s_per_1k": cpu / delivered * 1000 if delivered else None,
            "cpu_pct": 100 * cpu / span if span else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}


def check(name: str, target: str, value: float | None, ok: bool | None) -> Row:
    return {"check": name, "target": target, "value": value, "pass": ok}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _best(runs: list[Row], name: str) -> Row:
    """The median run by msg/s of one subject across repeats (one run: that run)."""
    rows = sorted((r[name] for r in runs), key=lambda r: r["msg_per_s"])
    return rows[len(rows) // 2]


def _burst_kw(sizes: Sizes, ep: Endpoint, qos: int) -> dict[str, Any]:
    return {"count": sizes.burst, "qos": qos, "rate": 0.0, "endpoint": ep,
            "deadline_s": max(120.0, sizes.burst / 500)}


def _median_of(sizes: Sizes, make: Callable[[], Subject], workdir: Path, kw: dict[str, Any]) -> Row:
    """Run one subject `sizes.repeat` times on fresh brokers; the median run by msg/s."""
    runs = []
    for i in range(sizes.repeat):
        subject = make()
        runs.append(run_group([subject], workdir=workdir / f"{subject.name}{i}", **kw))
    return _best(runs, subject.name)


def memory_floor(workdir: Path) -> Row:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "GATEWAY_", "AWS_"))}
    env.update(AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID="x",
               AWS_SECRET_ACCESS_KEY="x", AWS_ENDPOINT_URL_KINESIS="http://127.0.0.1:9")
    proc = subprocess.Popen([PY, "bench/baselines/memory_floor.py"], cwd=ROOT, stdout=subprocess.PIPE,
                            env=env)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(1.0)
        with Monitor() as mon:
            rss = mon.watch("floor", proc.pid).peak_bytes()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return {"subject": "memory floor", "peak_rss_mb": rss / MB}


def steady(sizes: Sizes, ep: Endpoint, wd: Path, floor_mb: float,
           externals: tuple[External, ...] = ()) -> tuple[Rows, Checks]:
    """(a) 100 msg/s: gateway, naive bridge, bare receive and any --subject side by side on one
    stream of messages. The gateway runs with its HTTP listener on, as Kubernetes runs it."""
    n = int(sizes.steady_rate * sizes.steady_s)
    routes = route_file(wd / "steady" / "routes.yaml", qos=1)
    others = [external(x, qos=1, topic=FILTER) for x in externals]
    gw = gateway("gateway", routes, env={"HTTP_PORT": str(free_port())})
    res = run_group([gw, naive(1, None), bare(1, n), *others], count=n, qos=1,
                    rate=sizes.steady_rate, endpoint=ep, workdir=wd / "steady",
                    deadline_s=sizes.steady_s + 120)
    names = ["bare", "naive", *(o.name for o in others), "gateway"]
    rows = [dict(res[k], scenario="a steady QoS1") for k in names]
    extra = [c for x, o in zip(externals, others) for c in steady_checks(x, res["gateway"], res[o.name])]
    g, b = res["gateway"], res["bare"]
    over = g["peak_rss_mb"] - floor_mb
    p50 = g["p50_ms"]
    return rows, [
        check("a: gateway CPU at 100 msg/s", "≤ 1.2 % of one core", g["cpu_pct"], g["cpu_pct"] <= 1.2),
        check("a: paho bare receive CPU at 100 msg/s (its floor here)", "report", b["cpu_pct"], None),
        check("a: p50 publish→readable", "≤ 250 ms", p50, p50 is not None and p50 <= 250),
        check("a: peak RSS over memory floor, MB", "≤ +8 MB", over, over <= 8),
        check("a: gateway process peak RSS at 100 msg/s, HTTP listener on, MB", "≤ 32 MB", g["root_rss_mb"],
              g["root_rss_mb"] <= 32),
        check("a: lost + duplicated", "0", g["lost"] + g["duplicates"], g["lost"] + g["duplicates"] == 0),
        *extra]


def burst(sizes: Sizes, ep: Endpoint, wd: Path, qos: int, target: float,
          backlog: int | None = None, externals: tuple[External, ...] = ()) -> tuple[Rows, Checks, Row]:
    """(b) a burst at one QoS: bare receive, naive bridge (time-capped), any --subject, gateway,
    one at a time."""
    tag, where = f"b burst QoS{qos}", wd / f"burst{qos}"
    routes = route_file(where / "routes.yaml", qos=qos)
    kw = _burst_kw(sizes, ep, qos)
    env = {"GATEWAY_BACKLOG": str(backlog)} if backlog else {}
    b = _median_of(sizes, lambda: bare(qos, sizes.burst), where, kw)
    bf = _median_of(sizes, lambda: bare(qos, sizes.burst, fast_path=True), where, kw)
    nv = run_group([naive(qos, sizes.naive_cap_s)], workdir=where / "naive", **kw)["naive"]
    cap = sizes.subject_cap_s
    ext = {x: _median_of(sizes, lambda x=x: external(x, qos=qos, topic=FILTER, cap_s=cap), where, kw)  # type: ignore[misc]
           for x in externals}
    g = _median_of(sizes, lambda: gateway("gateway", routes, env=env, info={"backlog": backlog or 20000}),
                   where, kw)
    rows = [dict(r, scenario=tag) for r in (b, bf, nv, *ext.values(), g)]
    if qos == 0 and sizes.small_backlog:
        small_env = {"GATEWAY_BACKLOG": str(sizes.small_backlog)}
        small = run_group([gateway("gateway-backlog", routes, env=small_env,
                                   info={"backlog": sizes.small_backlog})],
                          workdir=where / "small-backlog", **kw)["gateway-backlog"]
        rows.append(dict(small, scenario=tag))
    ratio = _ratio(g["msg_per_s"], b["msg_per_s"])
    cost = _ratio(b["cpu_s_per_1k"], g["cpu_s_per_1k"])
    label = "at-least-once" if qos else "at-most-once"
    checks = [check(f"b: QoS{qos} gateway / paho bare rate ({label})", f"≥ {target:.0%}", ratio,
                    ratio is not None and ratio >= target),
              check(f"b: QoS{qos} same, from CPU per message (bare ÷ gateway)", f"≥ {target:.0%}", cost,
                    cost is not None and cost >= target),
              check(f"b: QoS{qos} gateway / bare rate of paho with the gateway's fast path", "report",
                    _ratio(g["msg_per_s"], bf["msg_per_s"]), None),
              check(f"b: QoS{qos} lost", "0", g["lost"], g["lost"] == 0)]
    if qos:
        checks.append(check("b: QoS1 duplicated (no fault injected)", "0", g["duplicates"],
                            g["duplicates"] == 0))
    checks += [c for x, r in ext.items() for c in burst_checks(x, qos, g, r, b)]
    return rows, checks, g


def workers(sizes: Sizes, ep: Endpoint, wd: Path) -> tuple[Rows, Checks]:
    """(c) `run --workers 1` vs `--workers 2` in one shared-subscription group, QoS 1 burst."""
    routes = route_file(wd / "workers" / "routes.yaml", qos=1)
    kw = _burst_kw(sizes, ep, 1)
    out = {w: _median_of(sizes, lambda w=w: gateway(f"workers{w}", routes, workers=w,  # type: ignore[misc]
                                                      env={"MQTT_SHARE_GROUP": "bench"}),
                         wd / "workers", kw) for w in (1, 2)}
    shared = run_group(bare_shared(1, 2), workdir=wd / "workers" / "bare-share", **kw)
    ceiling = _combined([shared["bare-share0"], shared["bare-share1"]])
    ratio = _ratio(out[2]["msg_per_s"], out[1]["msg_per_s"])
    bad = sum(out[w]["lost"] + out[w]["duplicates"] for w in (1, 2))
    cores = os.cpu_count() or 1
    rows = [dict(ceiling, scenario="c workers QoS1")] + [dict(out[w], scenario="c workers QoS1") for w in (1, 2)]
    return rows, [
        check("c: 2 workers / 2 bare paho receivers in one share group (the broker's ceiling here)", "report",
              _ratio(out[2]["msg_per_s"], ceiling["msg_per_s"]), None),
        check("c: throughput 2 workers / 1 worker", "≥ 1.7×", ratio, ratio is not None and ratio >= 1.7),
        check("c: lost + duplicated (both runs)", "0", bad, bad == 0),
        *(check(f"c: machine busy during the {w}-worker run (gateway + broker + publisher + endpoint, "
                f"% of {cores} cores)", "report", _machine_busy_pct(out[w], cores), None) for w in (1, 2))]


def _machine_busy_pct(row: Row, cores: int) -> float | None:
    """How much of the machine the run used: when this nears 100 %, more workers cannot help."""
    run = row.get("run") or {}
    window = run.get("window_s")
    if not window or row.get("cpu_s") is None:
        return None
    used_s = row["cpu_s"] + (run.get("broker_cpu_s") or 0) + (run.get("endpoint_cpu_s") or 0) \
        + ((run.get("publisher") or {}).get("cpu") or 0)
    return 100 * used_s / window / cores


def many_routes(sizes: Sizes, ep: Endpoint, wd: Path, one_route: Row | None) -> tuple[Rows, Checks]:
    """(d) 1 + 10,000 non-matching routes vs 1 route, QoS 0 burst."""
    kw = _burst_kw(sizes, ep, 0)
    routes = route_file(wd / "routes" / "routes.yaml", qos=0, extra_routes=sizes.extra_routes)
    many = _median_of(sizes, lambda: gateway("routes10k", routes, info={"routes": sizes.extra_routes + 1}),
                      wd / "routes", kw)
    if one_route is None:
        one = route_file(wd / "routes" / "one.yaml", qos=0)
        one_route = _median_of(sizes, lambda: gateway("gateway", one), wd / "routes", kw)
    ratio = _ratio(many["msg_per_s"], one_route["msg_per_s"])
    return [dict(many, scenario="d 10,001 routes QoS0")], [
        check("d: throughput 10,001 routes / 1 route", "≥ 0.90 (cost ≤ 10 %)", ratio,
              ratio is not None and ratio >= 0.9)]


def aggregation(sizes: Sizes, ep: Endpoint, wd: Path, plain: dict[int, Row]) -> tuple[Rows, Checks]:
    """(f) KPL aggregation (`aggregate: true`) vs the plain bursts, at QoS 0 and at QoS 1."""
    rows: Rows = []
    checks: Checks = []
    for qos, base in sorted(plain.items()):
        routes = route_file(wd / f"agg{qos}" / "routes.yaml", qos=qos, aggregate=True)
        agg = _median_of(sizes, lambda r=routes: gateway("aggregate", r, aggregated=True),
                         wd / f"agg{qos}", _burst_kw(sizes, ep, qos))
        rows.append(dict(agg, scenario=f"f KPL aggregate QoS{qos}"))
        checks += [
            check(f"f: QoS {qos} Kinesis records, plain / aggregated", "report",
                  _ratio(base["kinesis_records"], agg["kinesis_records"]), None),
            check(f"f: QoS {qos} throughput, aggregated / plain", "report",
                  _ratio(agg["msg_per_s"], base["msg_per_s"]), None),
            check(f"f: QoS {qos} CPU per message, plain / aggregated", "report",
                  _ratio(base["cpu_s_per_1k"], agg["cpu_s_per_1k"]), None),
            check(f"f: QoS {qos} aggregated lost", "0", agg["lost"], agg["lost"] == 0)]
    return rows, checks


def _spool_gateway(name: str, routes: Path, spool_root: Path) -> Subject:
    """The gateway with GATEWAY_SPOOL_DIR set (a fresh directory per run) and its /metrics read
    at the start and end of the window, for the spool's commits."""
    port = free_port()
    spool_dir = spool_root / f"{name}-{time.monotonic_ns()}"

    def probe() -> dict[str, float]:
        return scrape(port, ("spool_commits_total", "spool_commit_duration_seconds_sum",
                             "spool_commit_duration_seconds_count"))

    subject = gateway(name, routes, stream=SPOOL_STREAM, probe=probe,
                      env={"GATEWAY_SPOOL_DIR": str(spool_dir), "HTTP_PORT": str(port)},
                      info={"kind": "gateway, spool on", "spool": True})
    # a burst's large group commits can hold delivery for more than the run's 3 s idle: done only
    # after 10 s without a record, its window ending at the last one (as for a --subject)
    subject.quiet_s = 10.0
    return subject


def create_stream(ep: Endpoint, name: str, shards: int) -> None:
    """CreateStream at the bench endpoint (once: a stream that exists already is fine)."""
    req = urllib.request.Request(ep.url, method="POST", data=orjson.dumps({"StreamName": name, "ShardCount": shards}),
                                 headers={"X-Amz-Target": "Kinesis_20131202.CreateStream",
                                          "Content-Type": "application/x-amz-json-1.1"})
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as exc:
        if b"ResourceInUseException" not in exc.read():
            raise


def scrape(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Samples of `names` (prefix `mqtt_kinesis_gateway_` implied) from a gateway's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        bare = key.split("{", 1)[0].removeprefix("mqtt_kinesis_gateway_")
        if bare in out:
            out[bare] += float(value)
    return out


def _commits(row: Row) -> tuple[float | None, float | None]:
    """(commits per second over the run, mean commit ms) of a spool-on row."""
    probe, span = row.get("probe") or {}, row.get("span_s")
    commits = probe.get("spool_commits_total")
    per_s = commits / span if commits and span else None
    n = probe.get("spool_commit_duration_seconds_count")
    mean_ms = 1000 * probe["spool_commit_duration_seconds_sum"] / n if n else None
    return per_s, mean_ms


def spool(sizes: Sizes, ep: Endpoint, wd: Path) -> tuple[Rows, Checks]:
    """(g) spool off vs on (GATEWAY_SPOOL_DIR): side by side at 100 msg/s on one load, then a QoS 1
    burst each, one after the other, each into a stream of SPOOL_SHARDS shards."""
    where = wd / "spool"
    n = int(sizes.steady_rate * sizes.steady_s)
    for name in (SPOOL_OFF_STREAM, SPOOL_STREAM):
        create_stream(ep, name, SPOOL_SHARDS)
    off_routes = route_file(where / "off.yaml", qos=1, stream=SPOOL_OFF_STREAM)
    on_routes = route_file(where / "on.yaml", qos=1, stream=SPOOL_STREAM)
    res = run_group([gateway("spool-off", off_routes, stream=SPOOL_OFF_STREAM, info={"kind": "gateway, spool off"}),
                     _spool_gateway("spool-on", on_routes, where / "dirs")], count=n, qos=1,
                    rate=sizes.steady_rate, endpoint=ep, workdir=where / "steady", deadline_s=sizes.steady_s + 120)
    s_off, s_on = res["spool-off"], res["spool-on"]
    kw = _burst_kw(sizes, ep, 1)
    b_off = _median_of(sizes, lambda: gateway("spool-off", off_routes, stream=SPOOL_OFF_STREAM, info={"kind": "gateway, spool off"}),
                       where / "burst", kw)
    b_on = _median_of(sizes, lambda: _spool_gateway("spool-on", on_routes, where / "dirs"), where / "burst", kw)
    rows = [dict(s_off, scenario="g spool, steady QoS1"), dict(s_on, scenario="g spool, steady QoS1"),
            dict(b_off, scenario="g spool, burst QoS1"), dict(b_on, scenario="g spool, burst QoS1")]
    ratio = _ratio(b_on["msg_per_s"], b_off["msg_per_s"])
    steady_commits, steady_ms = _commits(s_on)
    burst_commits, burst_ms = _commits(b_on)
    bad = sum(r["lost"] + r["duplicates"] for r in (s_off, s_on, b_off, b_on))
    return rows, [
        check("g: burst QoS1 msg/s, spool on / off", "≥ 70 %", ratio, ratio is not None and ratio >= 0.70),
        check("g: CPU at 100 msg/s, spool off (% of one core)", "report", s_off["cpu_pct"], None),
        check("g: CPU at 100 msg/s, spool on (% of one core)", "report", s_on["cpu_pct"], None),
        check("g: spool commits per second at 100 msg/s", "report", steady_commits, None),
        check("g: spool commits per second in the QoS1 burst", "report", burst_commits, None),
        check("g: mean spool commit ms at 100 msg/s", "report", steady_ms, None),
        check("g: mean spool commit ms in the burst", "report", burst_ms, None),
        check("g: peak RSS MB in the burst, spool on / off", "report",
              _ratio(b_on["peak_rss_mb"], b_off["peak_rss_mb"]), None),
        check("g: lost + duplicated (all four runs)", "0", bad, bad == 0)]
