"""The results as a Markdown table (stdout, README) and as JSON (bench/results/<timestamp>.json)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from bench.services import MOSQUITTO_LIMITS, mosquitto_version

COLUMNS = [("scenario", "Scenario"), ("label", "Subject"), ("delivered", "Msgs"), ("msg_per_s", "msg/s"),
           ("cpu_s_per_1k", "CPU s/1k msg"), ("cpu_pct", "CPU %"), ("peak_rss_mb", "Peak RSS MB"),
           ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("lost", "Lost"), ("duplicates", "Dup")]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for dist in ("paho-mqtt", "boto3", "botocore", "orjson"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        versions["mqtt-kinesis-gateway"] = metadata.version("mqtt-kinesis-gateway")
    except metadata.PackageNotFoundError:
        versions["mqtt-kinesis-gateway"] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "python": sys.version.split()[0], "mosquitto": mosquitto_version(),
            "mosquitto_limits": MOSQUITTO_LIMITS, "versions": versions}


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "msg_per_s":
        return f"{value:,.0f}"
    if key in ("delivered", "lost", "duplicates"):
        return f"{value:,}"
    if key == "cpu_s_per_1k":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def label(row: dict[str, Any]) -> str:
    kind = row.get("kind") or row.get("subject", "")
    if kind == "gateway":
        extra = []
        if row.get("workers", 1) > 1 or "workers" in str(row.get("subject")):
            extra.append(f"{row.get('workers', 1)} worker{'s' if row.get('workers', 1) > 1 else ''}")
        if row.get("routes"):
            extra.append(f"{row['routes']:,} routes")
        if row.get("subject") == "gateway-backlog":
            extra.append(f"GATEWAY_BACKLOG {row['backlog']:,}")
        if row.get("subject") == "aggregate":
            extra.append("aggregate")
        return "gateway" + (f" ({', '.join(extra)})" if extra else "")
    if row.get("died"):
        return f"{label(dict(row, died=None))} (DIED: {row['died'].splitlines()[0][:60]})"
    if row.get("capped"):
        return f"{kind} (time-capped)"
    return kind


def table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = "|" + "|".join("---" if k in ("scenario", "label") else "---:" for k, _ in COLUMNS) + "|"
    lines = [head, sep]
    for row in rows:
        row = dict(row, label=label(row))
        if row.get("capped"):
            row["lost"] = None
        lines.append("| " + " | ".join(_fmt(k, row.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def checks_table(checks: list[dict[str, Any]]) -> str:
    lines = ["| Target | Goal | Measured | Met |", "|---|---|---:|:---:|"]
    for c in checks:
        v = c["value"]
        shown = "–" if v is None else (f"{v:.2f}" if isinstance(v, float) else f"{v:,}")
        met = {True: "yes", False: "**no**", None: "–"}[c["pass"]]
        lines.append(f"| {c['check']} | {c['target']} | {shown} | {met} |")
    return "\n".join(lines)


def context_lines(result: dict[str, Any]) -> list[str]:
    out = []
    m = result["machine"]
    out.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['os']}, Python {m['python']}, "
               f"{m['mosquitto']}, paho-mqtt {m['versions']['paho-mqtt']}, boto3 {m['versions']['boto3']}.")
    lim = ", ".join(f"`{k} {v}`" for k, v in m["mosquitto_limits"].items())
    out.append(f"Mosquitto limits set by the bench: {lim}.")
    ceil = result.get("endpoint_ceiling")
    if ceil:
        b, s = ceil["batched"], ceil["single"]
        out.append(f"Kinesis endpoint alone (bench/endpoint.py): {b['observed_records_per_s']:,.0f} "
                   f"records/s observed in 500-record PutRecords ({b['endpoint_cpu_us_per_record']:.1f} µs "
                   f"of its CPU per record, ceiling ≈ {b['cpu_bound_ceiling_records_per_s']:,.0f}/s on one "
                   f"core); {s['observed_records_per_s']:,.0f} single PutRecord requests/s.")
    floor = result.get("memory_floor")
    if floor:
        out.append(f"Memory floor (paho client + boto3 Kinesis client, nothing else): "
                   f"{floor['peak_rss_mb']:.1f} MB RSS.")
    lk = result.get("lookup")
    if lk and "skipped" not in lk:
        parts = [f"{k}: {v['matching_distinct_topics_us']:.1f} µs per trie lookup (distinct topics), "
                 f"{v['matching_same_topic_us']:.2f} µs memoised, {v['route_distinct_topics_us']:.1f} µs "
                 f"route() incl. JSON + key, file loaded and validated in {v['load_s']:.2f} s"
                 for k, v in lk.items()]
        out.append("Routing lookup (e): " + "; ".join(parts) + ".")
    elif lk:
        out.append(f"Routing lookup (e): skipped ({lk['skipped']}).")
    return out


def render(result: dict[str, Any]) -> str:
    parts = [table(result["rows"]), "", checks_table(result["checks"]), ""]
    parts += [f"- {line}" for line in context_lines(result)]
    for note in result.get("notes", []):
        parts.append(f"- {note}")
    return "\n".join(parts)
