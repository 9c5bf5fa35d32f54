"""Semantic checks of a route file: what JSON Schema cannot express, and building the table.

Runs after schema validation on the same JSON-shaped data and tolerates values of the wrong type
(the schema already reported those), so that one run reports every problem. Rules:

* ``topic-filter``: MQTT filter syntax (``#`` last and alone in its level, ``+`` alone in its
  level, no ``$share/``, not empty);
* ``jmespath-syntax`` / ``jmespath-function``: expressions compile, use known functions with the
  right number of arguments; the column points at the offending character where the YAML scalar
  allows it;
* ``jmespath-nesting``: function calls, lists and objects nest at most 16 levels, since each
  level can double what a message costs (gateway/routing/cost.py);
* ``raw-expression``: a ``format: raw`` route never parses its payload, so its expressions may use
  only ``topic()``, ``uuid()``, ``timestamp()`` and literals;
* ``missing-key``: ``topic``, ``stream`` and ``partition_key`` set in the route or in ``defaults``;
* ``duplicate-route``, ``topic-name`` and ``dead-letter-loop`` (dead-letter topics), and
  ``partition-key`` / ``explicit-hash-key`` for literals that can never be valid;
* ``overlap`` (info): a topic can match two routes; allowed, each route gets the message;
* ``overlapping-filters`` (warning): two filters the gateway subscribes to share topics without
  one covering the other; on MQTT 3.1.1 a broker that sends a copy per subscription makes the
  gateway write such a message twice (docs/delivery.md#overlapping-subscriptions).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from gateway.model import MAX_PARTITION_KEY_CHARS, is_hash_key
from gateway.routefile.findings import Finding, Severity, format_path
from gateway.routefile.yamlreader import JsonPath, Located, is_plain
from gateway.routing.expressions import Expression, ExpressionError, compile_expression
from gateway.routing.table import DeadLetter, Route
from gateway.routing.topics import TopicTrie, filter_error, minimal_subscriptions, topic_name_error

__all__ = ["SemanticResult", "check_routes"]

_REQUIRED = ("topic", "stream", "partition_key")
_EXPRESSIONS = ("partition_key", "explicit_hash_key", "filter", "transform")


@dataclass
class SemanticResult:
    findings: list[Finding] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Spec:
    path: JsonPath  # ("routes", index)
    route: dict[str, Any]  # as written
    effective: dict[str, Any]  # defaults overlaid by the route


@dataclass
class _Ctx:
    filename: str
    text: str
    where: Mapping[JsonPath, Located]
    result: SemanticResult
    compiled: dict[JsonPath, Expression | None] = field(default_factory=dict)

    def node(self, path: JsonPath) -> yaml.Node | None:
        located = self.where.get(path)
        return None if located is None else located.value

    def add(self, path: JsonPath, rule: str, message: str, severity: Severity = "error",
            offset: int | None = None, shown_path: JsonPath | None = None) -> None:
        located = self.where.get(path)
        line, col = 1, 1
        if located is not None:
            node = located.value
            line, col = node.start_mark.line + 1, node.start_mark.column + 1
            if offset is not None:
                col += _scalar_offset(node, offset, self.text)
        self.result.findings.append(
            Finding(self.filename, line, col, format_path(shown_path or path), rule, severity, message))


def _scalar_offset(node: yaml.Node, offset: int, text: str) -> int:
    """Columns from a scalar's start to character ``offset`` of its value, when knowable.

    Plain one-line scalars map 1:1; quoted ones add the opening quote, provided the source text
    between the quotes is exactly the value (no escapes). Anything else points at the scalar.
    """
    if not isinstance(node, yaml.ScalarNode) or node.start_mark.line != node.end_mark.line:
        return 0
    raw = text[node.start_mark.index:node.end_mark.index]
    if is_plain(node) and raw == node.value:
        return max(0, min(offset, len(raw)))
    if node.style in ("'", '"') and raw[1:-1] == node.value:
        return 1 + max(0, min(offset, len(node.value)))
    return 0


def _strings(value: Any) -> list[tuple[int | None, str]]:
    if isinstance(value, str):
        return [(None, value)]
    if isinstance(value, list):
        return [(i, v) for i, v in enumerate(value) if isinstance(v, str)]
    return []


def _compile(ctx: _Ctx, path: JsonPath, source: Any) -> Expression | None:
    if path in ctx.compiled:
        return ctx.compiled[path]
    expression: Expression | None = None
    if isinstance(source, str):
        try:
            expression = compile_expression(source)
        except ExpressionError as error:
            rule = {"syntax": "jmespath-syntax", "function": "jmespath-function"}.get(error.kind, "jmespath-nesting")
            ctx.add(path, rule, f"{path[-1]}: {error.message}", offset=error.offset)
        except (RecursionError, ValueError, TypeError, KeyError, IndexError) as error:
            ctx.add(path, "jmespath-syntax", f"{path[-1]}: invalid JMESPath ({type(error).__name__})")
    ctx.compiled[path] = expression
    return expression


def _check_literals(ctx: _Ctx, path: JsonPath, key: str, expression: Expression) -> None:
    if not expression.is_constant:
        return
    value = expression.evaluate(None)
    if key == "partition_key":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            ctx.add(path, "partition-key",
                    "partition_key: a literal key must be a string or number, e.g. \"`sensor-data`\"")
        elif isinstance(value, str) and not 1 <= len(value) <= MAX_PARTITION_KEY_CHARS:
            ctx.add(path, "partition-key", f"partition_key: a key is 1 to {MAX_PARTITION_KEY_CHARS} characters")
    elif key == "explicit_hash_key":
        text = str(value) if type(value) is int else value
        if not is_hash_key(text):
            ctx.add(path, "explicit-hash-key", "explicit_hash_key: must be a decimal integer in 0..2^128-1")


def _topic_name_error(topic: str) -> str | None:
    problem = topic_name_error(topic)
    if problem is not None:
        return f"dead-letter topic: {problem}"
    if topic.startswith("$"):
        return "a dead-letter topic must not start with '$' (reserved for the broker)"
    return None


def _defaults_checks(ctx: _Ctx, defaults: dict[str, Any]) -> None:
    for key in _EXPRESSIONS:
        expression = _compile(ctx, ("defaults", key), defaults.get(key))
        if expression is not None:
            _check_literals(ctx, ("defaults", key), key, expression)
    for index, topic in _strings(defaults.get("topic")):
        problem = filter_error(topic)
        if problem is not None:
            ctx.add(("defaults", "topic") + (() if index is None else (index,)), "topic-filter", problem)
    _dead_letter_topic(ctx, ("defaults",), defaults.get("dead_letter"))


def _dead_letter_topic(ctx: _Ctx, base: JsonPath, dead_letter: Any) -> None:
    if isinstance(dead_letter, dict) and isinstance(dead_letter.get("topic"), str):
        problem = _topic_name_error(dead_letter["topic"])
        if problem is not None:
            ctx.add(base + ("dead_letter", "topic"), "topic-name", problem)


def _source(route_path: JsonPath, route: dict[str, Any], key: str) -> JsonPath:
    """Where the effective value of ``key`` comes from: the route itself or ``defaults``."""
    return route_path + (key,) if key in route else ("defaults", key)


def _overlap_findings(ctx: _Ctx, entries: list[tuple[str, JsonPath, JsonPath, str]]) -> None:
    """entries: (route name, route path, filter path, filter). One info per pair of routes."""
    reported: set[tuple[str, str]] = set()
    trie: TopicTrie[int] = TopicTrie((entry[3], index) for index, entry in enumerate(entries))
    for j, (name_b, _, path_b, filter_b) in enumerate(entries):
        for index in trie.overlapping(filter_b):  # in file order: only the filters before this one
            if index >= j:
                break
            name_a, _, path_a, filter_a = entries[index]
            if name_a == name_b or (name_a, name_b) in reported:
                continue
            reported.add((name_a, name_b))
            node = ctx.node(path_a)
            line = node.start_mark.line + 1 if node is not None else 0
            ctx.add(path_b, "overlap",
                    f"topic filter '{filter_b}' overlaps '{filter_a}' of route '{name_a}' (line {line}):"
                    " a message on a topic both match goes to both routes", severity="info")


def _partial_overlap_findings(ctx: _Ctx, entries: list[tuple[str, JsonPath, JsonPath, str]]) -> None:
    """One warning per pair of subscribed filters that share topics, neither covering the other."""
    owner: dict[str, tuple[str, JsonPath]] = {}
    for name, _, path, topic_filter in entries:
        owner.setdefault(topic_filter, (name, path))
    subscribed = [f for f, _ in minimal_subscriptions((f, 1) for f in owner)]
    if len(subscribed) < 2:
        return
    position = {f: i for i, f in enumerate(owner)}
    order = {f: position[f] for f in subscribed}
    trie: TopicTrie[str] = TopicTrie((f, f) for f in subscribed)
    for filter_b in sorted(subscribed, key=order.__getitem__):
        for filter_a in trie.overlapping(filter_b):
            if order[filter_a] >= order[filter_b]:
                continue
            (name_a, path_a), (name_b, path_b) = owner[filter_a], owner[filter_b]
            node = ctx.node(path_a)
            line = node.start_mark.line + 1 if node is not None else 0
            routes = f"route '{name_b}'" if name_a == name_b else f"routes '{name_a}' and '{name_b}'"
            ctx.add(path_b, "overlapping-filters",
                    f"topic filter '{filter_b}' (route '{name_b}') and '{filter_a}' (route '{name_a}', line {line})"
                    f" overlap in part and are both subscribed: on MQTT 3.1.1 a broker that sends a copy per"
                    f" subscription (ejabberd, amqtt) makes a message on a topic both match arrive twice, and"
                    f" {routes} write it twice; MQTT 5 routes it once (subscription identifiers)",
                    severity="warning")


def check_routes(data: dict[str, Any], where: Mapping[JsonPath, Located], text: str, filename: str,
                 build: bool = True) -> SemanticResult:
    """Check the document; build the routes when ``build`` and nothing is wrong."""
    ctx = _Ctx(filename, text, where, SemanticResult())
    defaults: dict[str, Any] = data["defaults"] if isinstance(data.get("defaults"), dict) else {}
    _defaults_checks(ctx, defaults)
    routes: list[Any] = data["routes"] if isinstance(data.get("routes"), list) else []
    names: dict[str, JsonPath] = {}
    overlap_entries: list[tuple[str, JsonPath, JsonPath, str]] = []
    specs: list[_Spec] = []
    for index, route in enumerate(routes):
        path: JsonPath = ("routes", index)
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in names:
                first = ctx.node(names[name] + ("name",))
                line = first.start_mark.line + 1 if first is not None else 0
                ctx.add(path + ("name",), "duplicate-route", f"route name '{name}' is already used at line {line}")
            else:
                names[name] = path
        label = f"route '{name}'" if isinstance(name, str) else f"route {index + 1}"
        effective = {**defaults, **route}
        for key in _REQUIRED:
            if key not in effective:
                ctx.add(path, "missing-key", f"{label} has no '{key}' (set it in the route or in defaults)",
                        shown_path=path + (key,))
        if "topic" in route:
            for item, topic in _strings(route["topic"]):
                topic_path = path + ("topic",) + (() if item is None else (item,))
                problem = filter_error(topic)
                if problem is not None:
                    ctx.add(topic_path, "topic-filter", problem)
                elif isinstance(name, str):
                    overlap_entries.append((name, path, topic_path, topic))
        elif isinstance(name, str):
            for item, topic in _strings(defaults.get("topic")):
                if filter_error(topic) is None:
                    topic_path = ("defaults", "topic") + (() if item is None else (item,))
                    overlap_entries.append((name, path, topic_path, topic))
        raw = effective.get("format") == "raw"
        for key in _EXPRESSIONS:
            if key not in route:
                continue
            expression = _compile(ctx, path + (key,), route[key])
            if expression is not None:
                _check_literals(ctx, path + (key,), key, expression)
        for key in _EXPRESSIONS:
            if key in effective:
                source_path = _source(path, route, key)
                expression = ctx.compiled.get(source_path)
                if raw and expression is not None and expression.references_payload:
                    ctx.add(source_path, "raw-expression",
                            f"{label} has format raw: its payload is never parsed, so {key} may use only "
                            "topic(), uuid(), timestamp() and literals")
        if "dead_letter" in route:
            _dead_letter_topic(ctx, path, route["dead_letter"])
        specs.append(_Spec(path, route, effective))
    _dead_letter_loops(ctx, specs, overlap_entries)
    _overlap_findings(ctx, overlap_entries)
    _partial_overlap_findings(ctx, overlap_entries)
    if build and not any(f.is_error for f in ctx.result.findings):
        ctx.result.routes = [_build(ctx, spec) for spec in specs]
    return ctx.result


def _dead_letter_loops(ctx: _Ctx, specs: list[_Spec], entries: list[tuple[str, JsonPath, JsonPath, str]]) -> None:
    if not any(isinstance(spec.effective.get("dead_letter"), dict) for spec in specs):
        return
    trie: TopicTrie[tuple[str, str]] = TopicTrie((f, (name, f)) for name, _, _, f in entries)
    seen: set[JsonPath] = set()
    for spec in specs:
        dead_letter = spec.effective.get("dead_letter")
        if not (isinstance(dead_letter, dict) and isinstance(dead_letter.get("topic"), str)):
            continue
        topic = dead_letter["topic"]
        if _topic_name_error(topic) is not None:
            continue
        source = _source(spec.path, spec.route, "dead_letter") + ("topic",)
        if source in seen:
            continue
        seen.add(source)
        for name, topic_filter in trie.match(topic)[:1]:
            ctx.add(source, "dead-letter-loop",
                    f"dead-letter topic '{topic}' matches topic filter '{topic_filter}' of route '{name}':"
                    " dead letters would be routed again")


def _iter_filters(value: Any) -> Iterator[str]:
    yield from (topic for _, topic in _strings(value))


def _build(ctx: _Ctx, spec: _Spec) -> Route:
    values = spec.effective

    def expression(key: str) -> Expression | None:
        if key not in values:
            return None
        return ctx.compiled.get(_source(spec.path, spec.route, key))

    dead_letter = values.get("dead_letter")
    dead = None
    if isinstance(dead_letter, dict):
        dead = (DeadLetter("kinesis", dead_letter["stream"]) if "stream" in dead_letter
                else DeadLetter("mqtt", dead_letter["topic"]))
    node = ctx.node(spec.path)
    partition_key = expression("partition_key")
    assert partition_key is not None  # guaranteed: no findings means it compiled
    return Route(
        name=values["name"],
        filters=tuple(dict.fromkeys(_iter_filters(values["topic"]))),
        stream=values["stream"],
        partition_key=partition_key,
        qos=values.get("qos", 1),
        explicit_hash_key=expression("explicit_hash_key"),
        filter=expression("filter"),
        transform=expression("transform"),
        format=values.get("format", "json"),
        append_newline=values.get("append_newline", False),
        dead_letter=dead,
        aggregate=values.get("aggregate", False),
        retained=values.get("retained", "new_subscription"),
        line=node.start_mark.line + 1 if node is not None else 0,
    )
