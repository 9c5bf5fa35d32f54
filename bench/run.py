"""The benchmark, in one command: `python -m bench.run` (full, ~10–15 min) or `--quick` (~2 min).

Starts a local Mosquitto (fresh per measured run) and the bench Kinesis endpoint, measures the
endpoint alone, the memory floor and the routing lookup, then runs the gateway and its baselines
on the same payload and reads back every record. Prints a Markdown table and writes
bench/results/<timestamp>.json. Scenarios: a steady 100 msg/s, b bursts (QoS 0 and QoS 1),
c workers, d 10,000 routes, e routing lookup, f KPL aggregation, g the spool on vs off
(GATEWAY_SPOOL_DIR: CPU at 100 msg/s, QoS 1 burst rate, commits per second, RSS); select with
`--only a,b`.
`--subject NAME=COMMAND` adds any other bridge to a and b (bench/subject.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py` as well as `python -m bench.run`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from bench import runner
from bench import scenarios as sc
from bench.ceiling import measure_ceiling
from bench.lookup import lookup_in_subprocess
from bench.report import machine, render
from bench.services import Endpoint
from bench.subject import SubjectError, parse_subjects

RESULTS = Path(__file__).resolve().parent / "results"
ALL = "abcdefg"


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke version (~2 min)")
    ap.add_argument("--only", default=ALL, help="scenarios to run, e.g. 'a,b' (default: all of a-g)")
    ap.add_argument("--burst", type=int, help="burst size (default 100000, quick 20000)")
    ap.add_argument("--steady-s", type=float, help="length of the 100 msg/s run (default 60, quick 10)")
    ap.add_argument("--repeat", type=int, default=1, help="repeat each burst run, keep the median")
    ap.add_argument("--backlog", type=int, help="GATEWAY_BACKLOG for the burst runs (default: gateway's)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON results")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, route files, broker logs)")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra setting for every gateway run, e.g. KINESIS_LINGER_MS=200 (repeatable)")
    ap.add_argument("--wait-idle", type=float, metavar="S",
                    help="before each run wait up to S s for the machine to be quiet "
                         "(<15 %% of a core busy); default 20, quick 3")
    ap.add_argument("--max-noise", type=float, default=runner.MAX_NOISE_PCT, metavar="PCT",
                    help="retry a run during which other processes used more than PCT %% of a core")
    ap.add_argument("--retries", type=int, help="retries of a disturbed run (default 2, quick 0)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--subject", action="append", default=[], metavar="NAME=COMMAND",
                    help="another bridge as an extra subject of a and b, configured by the Go bridge's .env "
                         "names (written to {env_file}, also in its environment); placeholders {port}, "
                         "{broker}, {topic}, {qos}, {stream}, {client_id}, {endpoint}, {region}, {env_file}, "
                         "{workdir} (repeatable)")
    args = ap.parse_args(argv)
    try:
        args.subjects = tuple(parse_subjects(args.subject))
    except SubjectError as exc:
        ap.error(str(exc))
    return args


def baseline_rows(ceiling: dict[str, Any], floor: dict[str, Any]) -> list[dict[str, Any]]:
    """The endpoint alone and the memory floor, as the first rows of the table."""
    rows = []
    for shape, kind in (("batched", "Kinesis endpoint alone, PutRecords ×500"),
                        ("single", "Kinesis endpoint alone, PutRecord ×1")):
        c = ceiling[shape]
        rows.append({"scenario": "0 ceilings", "kind": kind, "delivered": c["records"],
                     "msg_per_s": c["observed_records_per_s"],
                     "cpu_s_per_1k": c["endpoint_cpu_s"] / c["records"] * 1000 if c["records"] else None})
    rows.append({"scenario": "0 ceilings", "kind": "memory floor (paho + boto3 clients)",
                 "peak_rss_mb": floor["peak_rss_mb"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    only = set(args.only.replace(",", "")) & set(ALL)
    sizes = sc.Sizes.quick() if args.quick else sc.Sizes()
    over = {k: v for k, v in (("burst", args.burst), ("steady_s", args.steady_s)) if v}
    sizes = dataclasses.replace(sizes, repeat=max(1, args.repeat), **over)
    runner.MAX_NOISE_PCT = args.max_noise
    runner.WAIT_IDLE_S = args.wait_idle if args.wait_idle is not None else (3.0 if args.quick else 20.0)
    runner.RETRIES = args.retries if args.retries is not None else (0 if args.quick else 2)
    sc.GATEWAY_ENV.update(dict(kv.split("=", 1) for kv in args.gateway_env))
    wd = Path(tempfile.mkdtemp(prefix="mkg-bench-"))
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
                              "sizes": dataclasses.asdict(sizes), "scenarios": sorted(only),
                              "gateway_env": dict(sc.GATEWAY_ENV),
                              "subjects": {x.name: x.command for x in args.subjects},
                              "machine": machine(), "rows": [], "checks": [], "notes": []}
    rows, checks = result["rows"], result["checks"]
    t_start = time.monotonic()
    endpoint = Endpoint([sc.STREAM, sc.NAIVE_STREAM, *(x.stream for x in args.subjects)], wd).start()
    try:
        _log(f"endpoint on port {endpoint.port}; measuring it alone")
        result["endpoint_ceiling"] = measure_ceiling(endpoint, seconds=1.5 if args.quick else 3.0)
        _log("memory floor")
        result["memory_floor"] = floor = sc.memory_floor(wd)
        rows += baseline_rows(result["endpoint_ceiling"], floor)
        if "e" in only:
            _log("routing lookup (e)")
            result["lookup"] = lookup_in_subprocess(sizes.extra_routes)
        if "a" in only:
            _log(f"(a) steady {sizes.steady_rate:.0f} msg/s for {sizes.steady_s:.0f} s")
            r, c = sc.steady(sizes, endpoint, wd, floor["peak_rss_mb"], args.subjects)
            rows += r
            checks += c
        plain0 = None
        if "b" in only or "d" in only or "f" in only:
            _log(f"(b) burst of {sizes.burst:,} at QoS 0")
            r, c, plain0 = sc.burst(sizes, endpoint, wd, qos=0, target=0.70, backlog=args.backlog,
                                    externals=args.subjects if "b" in only else ())
            rows += r
            checks += c if "b" in only else []
        plain1 = None
        if "b" in only or "f" in only:
            _log(f"(b) burst of {sizes.burst:,} at QoS 1")
            r, c, plain1 = sc.burst(sizes, endpoint, wd, qos=1, target=0.60, backlog=args.backlog,
                                    externals=args.subjects if "b" in only else ())
            rows += r
            checks += c if "b" in only else []
        if "d" in only:
            _log(f"(d) {sizes.extra_routes + 1:,} routes")
            r, c = sc.many_routes(sizes, endpoint, wd, plain0)
            rows += r
            checks += c
        if "f" in only:
            _log("(f) KPL aggregation at QoS 0 and QoS 1")
            assert plain0 is not None and plain1 is not None
            r, c = sc.aggregation(sizes, endpoint, wd, {0: plain0, 1: plain1})
            rows += r
            checks += c
        if "g" in only:
            _log("(g) spool off vs on")
            r, c = sc.spool(sizes, endpoint, wd)
            rows += r
            checks += c
        if "c" in only:
            _log("(c) --workers 1 vs 2")
            r, c = sc.workers(sizes, endpoint, wd)
            rows += r
            checks += c
    finally:
        endpoint.stop()
        if args.keep:
            _log(f"work dir kept: {wd}")
        else:
            shutil.rmtree(wd, ignore_errors=True)
    runs = [r["run"] for r in rows if r.get("run")]
    busiest = max((run["endpoint_cpu_s"] / run["window_s"] for run in runs), default=0.0)
    result["notes"].append(f"The endpoint never used more than {100 * busiest:.0f} % of one core in any run, "
                           "so it was not the bottleneck.")
    noisy = max((run["others_cpu_pct"] for run in runs), default=0.0)
    skewed = " — figures are skewed; rerun on a quiet machine." if noisy > args.max_noise else "."
    result["notes"].append(f"Other processes on the machine used up to {noisy:.0f} % of one core during a "
                           f"measured run{skewed}")
    m = result["machine"]
    result["notes"].append(f"Every ratio above is between rows of this run on this machine ({m['cpu']}, "
                           f"{m['cores']} cores); absolute figures hold only here.")
    result["elapsed_s"] = time.monotonic() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(render(result))
    command = shlex.join(["python", "-m", "bench.run", *(sys.argv[1:] if argv is None else argv)])
    print(f"\nCommand: {command} — {result['elapsed_s']:.0f} s; "
          f"JSON: {os.path.relpath(path)}")
    return 1 if args.strict and any(c["pass"] is False for c in checks) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:  # a subject that would not start or deliver: what it said, no traceback
        print(f"bench: {exc}", file=sys.stderr)
        sys.exit(2)
