"""What `explain` and `test` show: a routing outcome as JSON, and test cases compared with it.

Pure functions over the route table's own values (``RouteTable.route`` is the code the gateway
runs); the command line does the file reading and the printing. Bad input raises ``InputError``
with a message that names the case or option, which the command line prints as a usage error.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.model import Message, Record, Rejected, RoutingOutcome
from gateway.routing.topics import topic_name_error

__all__ = ["Case", "InputError", "compare", "make_message", "metadata_line", "outcome_json", "parse_cases",
           "parse_user_properties"]


class InputError(ValueError):
    """A cases file, topic or option the commands cannot use (one line)."""


def outcome_json(outcome: RoutingOutcome) -> dict[str, Any]:
    if isinstance(outcome, Record):
        item: dict[str, Any] = {"route": outcome.route, "stream": outcome.stream,
                                "partition_key": outcome.partition_key}
        if outcome.explicit_hash_key is not None:
            item["explicit_hash_key"] = outcome.explicit_hash_key
        try:
            item["data"] = outcome.data.decode("utf-8")
        except UnicodeDecodeError:
            item["data_base64"] = base64.b64encode(outcome.data).decode("ascii")
        return item
    if isinstance(outcome, Rejected):
        return {"route": outcome.route, "rejected": outcome.reason}
    return {"route": outcome.route, "skipped": outcome.reason}


def make_message(topic: str, payload: bytes, qos: int) -> Message:
    problem = topic_name_error(topic)
    if problem is not None:
        raise InputError(f"topic {topic!r}: {problem}")
    return Message(topic=topic, payload=payload, qos=qos, received_ms=int(time.time() * 1000))


def parse_user_properties(pairs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    parsed: list[tuple[str, str]] = []
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key:
            raise InputError(f"--user-property {pair!r}: expected KEY=VALUE")
        parsed.append((key, value))
    return tuple(parsed)


def metadata_line(message: Message) -> str:
    """What the metadata functions return for ``message``, as explain shows it on stderr."""
    shown = {"topic()": message.topic, "timestamp()": message.received_ms, "qos()": message.qos,
             "retained()": message.retain, "content_type()": message.content_type,
             "user_properties()": dict(message.user_properties)}
    return "metadata: " + json.dumps(shown, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    topic: str
    payload: bytes
    expect: tuple[dict[str, Any], ...]


_EXPECT_KEYS = {"route", "stream", "partition_key", "explicit_hash_key", "data", "rejected", "skipped"}


def parse_cases(data: Any) -> list[Case]:
    """The cases file shape; raises InputError naming the first bad case."""
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise InputError("expected a mapping with a list under 'cases'")
    parsed: list[Case] = []
    for index, item in enumerate(data["cases"]):
        where = f"cases[{index}]"
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected a mapping with name, topic, payload, expect")
        unknown = set(item) - {"name", "topic", "payload", "expect"}
        if unknown:
            raise InputError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        name, topic, payload, expect = (item.get(k) for k in ("name", "topic", "payload", "expect"))
        if not isinstance(topic, str):
            raise InputError(f"{where}.topic: expected a string")
        if payload is None and "payload" not in item:
            raise InputError(f"{where}.payload: missing (a string, or a mapping written as JSON)")
        body = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else \
            json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogateescape")
        if not isinstance(expect, list) or not all(isinstance(e, dict) for e in expect):
            raise InputError(f"{where}.expect: expected a list of mappings")
        for number, entry in enumerate(expect):
            bad = set(entry) - _EXPECT_KEYS
            if bad or not isinstance(entry.get("route"), str):
                problem = f"unknown key {sorted(bad)[0]!r}" if bad else "'route' (a string) is required"
                raise InputError(f"{where}.expect[{number}]: {problem}")
        label = name if isinstance(name, str) and name else f"case {index + 1}"
        parsed.append(Case(label, topic, body, tuple(expect)))
    return parsed


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _data_matches(expected: Any, item: dict[str, Any]) -> bool:
    actual = item.get("data")
    if isinstance(expected, str):
        return actual == expected
    if actual is None:
        return False
    try:
        return bool(json.loads(actual) == expected)
    except ValueError:
        return False


def compare(case: Case, actual: list[dict[str, Any]]) -> list[str]:
    """Diff-like lines (``- expected`` / ``+ actual``); empty when the case passes."""
    lines: list[str] = []
    by_route = {item["route"]: item for item in actual}
    for entry in case.expect:
        route = entry["route"]
        got = by_route.pop(route, None)
        if got is None:
            lines += [f"- {route}: {_show(entry)}", f"+ {route}: (no outcome: the route did not match)"]
            continue
        if "rejected" in entry or "skipped" in entry:
            kind = "rejected" if "rejected" in entry else "skipped"
            ok = kind in got and str(entry[kind]) in str(got[kind])
            if not ok:
                lines += [f"- {route}: {_show({kind: entry[kind]})}", f"+ {route}: {_show(got)}"]
            continue
        if "stream" not in got:
            lines += [f"- {route}: a record", f"+ {route}: {_show(got)}"]
            continue
        for key in ("stream", "partition_key", "explicit_hash_key", "data"):
            if key not in entry:
                continue
            same = _data_matches(entry[key], got) if key == "data" else got.get(key) == entry[key]
            if not same:
                shown = got.get(key, got.get("data_base64") if key == "data" else None)
                lines += [f"- {route}.{key}: {_show(entry[key])}", f"+ {route}.{key}: {_show(shown)}"]
    for route, got in by_route.items():
        if "skipped" not in got:
            lines += [f"- {route}: (not expected)", f"+ {route}: {_show(got)}"]
    return lines
