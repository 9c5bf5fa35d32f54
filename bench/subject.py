"""Any bridge as an extra subject of the benchmark: `python -m bench.run --subject NAME=COMMAND`.

So that whoever has another bridge's binary (the Go bridge this gateway replaces, first of all)
can put it in the same run as the gateway and its baselines, and read ratios taken on one machine
in one run instead of comparing figures measured elsewhere. The bench configures the subject the
way the Go bridge is configured: its `.env` names, written to `<work dir>/.env` (the subject runs
in that directory, where such a bridge looks for it) and passed as environment variables too.
`{placeholder}`s in COMMAND are filled in from the same values (docs/performance.md#any-bridge-side-by-side).

Invariant: a COMMAND is checked when the option is parsed (one-line error naming the option), and
every value a subject is given (the .env, its environment, its placeholders) comes from one
mapping, `bridge_env`, so the three can never disagree.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.runner import Subject

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
PLACEHOLDERS = {"port": "PORT", "broker": "BROKER", "client_id": "CLIENTID", "topic": "TOPIC", "qos": "QOS",
                "stream": "KIN_STREAM_NAME", "endpoint": "AWS_ENDPOINT_URL_KINESIS", "region": "AWS_REGION",
                "env_file": None, "workdir": None}
QUIET_S = 10.0  # done after this long without a new record: more than the Go bridge's 5 s flush interval
REGION = "us-east-1"
Row = dict[str, Any]


class SubjectError(ValueError):
    """A `--subject` value that cannot be run; the message is one line."""


@dataclass(frozen=True)
class External:
    """One `--subject NAME=COMMAND`: the words of COMMAND, paths made absolute, placeholders still in."""

    name: str
    command: str
    words: tuple[str, ...]

    @property
    def stream(self) -> str:
        return f"bench-subject-{self.name}"

    @property
    def label(self) -> str:
        return f"{self.name} (--subject)"


def parse_subject(text: str, cwd: Path | None = None) -> External:
    """`NAME=COMMAND` → External; words of COMMAND naming a path that exists under `cwd` (the
    directory the bench was started in) are made absolute, since the subject runs in its work dir."""
    name, sep, command = text.partition("=")
    name, command = name.strip(), command.strip()
    if not sep or not NAME.fullmatch(name):
        raise SubjectError(f"--subject {text!r}: expected NAME=COMMAND, NAME of letters, digits, '.', '_' or '-' "
                           "(at most 40)")
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise SubjectError(f"--subject {name}: COMMAND does not parse as shell words ({exc})") from None
    if not words:
        raise SubjectError(f"--subject {name}: COMMAND is empty")
    unknown = sorted({m for w in words for m in PLACEHOLDER.findall(w)} - set(PLACEHOLDERS))
    if unknown:
        raise SubjectError(f"--subject {name}: unknown placeholder {{{unknown[0]}}}; known: "
                           + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
    base = cwd or Path.cwd()
    words = [str((base / w).resolve()) if "/" in w and not os.path.isabs(w) and (base / w).exists() else w
             for w in words]
    return External(name, command, tuple(words))


def parse_subjects(values: list[str], cwd: Path | None = None) -> list[External]:
    out = [parse_subject(v, cwd) for v in values]
    names = [e.name for e in out]
    for n in names:
        if names.count(n) > 1:
            raise SubjectError(f"--subject {n}: given twice")
    return out


def bridge_env(ext: External, *, mqtt_port: int, endpoint_url: str, qos: int, topic: str) -> dict[str, str]:
    """The Go bridge's `.env` names for this run (its meanings: docs/performance.md#any-bridge-side-by-side)."""
    return {"PORT": str(mqtt_port), "BROKER": "127.0.0.1", "CLIENTID": f"bench-{ext.name}-{time.monotonic_ns()}",
            "TOPIC": topic, "QOS": str(qos), "KIN_STREAM_NAME": ext.stream, "KIN_PARTITION_KEY": "device123",
            "KIN_MAXCONN": "10", "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
            "STDOUT": "false", "AWS_ENDPOINT_URL_KINESIS": endpoint_url}


def write_env_file(path: Path, env: dict[str, str]) -> Path:
    """NAME=value lines, unquoted: the Go bridge's loader and `docker run --env-file` both take a
    value literally up to the end of the line (none of the bench's values holds a space or newline)."""
    bad = [k for k, v in env.items() if any(c in v for c in " \n\r")]
    if bad:
        raise SubjectError(f"{path}: the value of {bad[0]} cannot be written unquoted")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return path


def substitute(words: tuple[str, ...] | list[str], env: dict[str, str], env_file: Path) -> list[str]:
    """COMMAND's words with `{port}`, `{env_file}`, … replaced by this run's values."""
    values = {p: env[n] if n else "" for p, n in PLACEHOLDERS.items()}
    values.update(env_file=str(env_file), workdir=str(env_file.parent))
    return [PLACEHOLDER.sub(lambda m: values[m.group(1)], w) for w in words]


def subject(ext: External, *, qos: int, topic: str, cap_s: float | None = None) -> Subject:
    """The runner's Subject for `ext`: its .env written and its command filled in once the run's
    broker port and endpoint are known; measured like the gateway (process tree, records read back)."""

    def prepare(mqtt_port: int, endpoint_url: str, workdir: Path) -> tuple[list[str], dict[str, str], Path]:
        env = bridge_env(ext, mqtt_port=mqtt_port, endpoint_url=endpoint_url, qos=qos, topic=topic)
        home = workdir / ext.name
        env_file = write_env_file(home / ".env", env)
        return substitute(ext.words, env, env_file), env, home

    return Subject(f"ext-{ext.name}", list(ext.words), stream=ext.stream, quiet_s=QUIET_S, prepare=prepare,
                   cap_s=cap_s, info={"kind": ext.label, "command": ext.command})


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _report(name: str, value: float | None) -> Row:
    return {"check": name, "target": "report", "value": value, "pass": None}


def steady_checks(ext: External, gateway: Row, row: Row) -> list[Row]:
    """(a) gateway ÷ subject at 100 msg/s, on one published load: below 1 the gateway uses less."""
    g, s = gateway, row
    return [_report(f"a: gateway ÷ {ext.name}, CPU at 100 msg/s", _ratio(g["cpu_pct"], s["cpu_pct"])),
            _report(f"a: gateway ÷ {ext.name}, peak RSS", _ratio(g["peak_rss_mb"], s["peak_rss_mb"])),
            _report(f"a: gateway ÷ {ext.name}, p50 publish→readable", _ratio(g["p50_ms"], s["p50_ms"])),
            _report(f"a: {ext.name} lost + duplicated", s["lost"] + s["duplicates"])]


def burst_checks(ext: External, qos: int, gateway: Row, row: Row,
                 bare: Row) -> list[Row]:
    """(b) gateway ÷ subject in one burst: above 1 the gateway is faster (rate), below 1 it is cheaper."""
    g, s, tag = gateway, row, f"b: QoS{qos}"
    return [_report(f"{tag} gateway ÷ {ext.name}, rate", _ratio(g["msg_per_s"], s["msg_per_s"])),
            _report(f"{tag} gateway ÷ {ext.name}, CPU per message", _ratio(g["cpu_s_per_1k"], s["cpu_s_per_1k"])),
            _report(f"{tag} gateway ÷ {ext.name}, peak RSS", _ratio(g["peak_rss_mb"], s["peak_rss_mb"])),
            _report(f"{tag} {ext.name} / paho bare receive, rate", _ratio(s["msg_per_s"], bare["msg_per_s"])),
            _report(f"{tag} {ext.name} lost + duplicated", s["lost"] + s["duplicates"])]
