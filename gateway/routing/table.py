"""The route table: an immutable value built once, read by the hot path without locks.

``RouteTable.route(message)`` is the whole routing core: it finds the routes whose filters match
the topic (a trie lookup, memoised per topic), parses a JSON payload at most once however many
routes match, and turns each route into a ``Record``, a ``Rejected`` with a reason, or a
``Skipped``. It does no I/O: ``explain``, ``test`` and the running gateway all call this same code.

Retained copies (``Message.retain``) are taken or skipped per route by its ``retained`` option;
``retain_handling`` is what the subscriptions must ask of an MQTT 5 broker so that every route
still gets what it chose: per subscribed filter, the most inclusive choice of the routes whose
filters share topics with it (docs/route-file.md#retained-messages).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, NamedTuple

import orjson

from gateway.model import (
    MAX_PARTITION_KEY_CHARS,
    Message,
    Record,
    Rejected,
    RoutingOutcome,
    Skipped,
    is_hash_key,
    record_size,
)
from gateway.routing.cost import ExpressionTooLarge
from gateway.routing.expressions import CONTEXT, Expression, compile_expression
from gateway.routing.topics import TopicTrie, minimal_subscriptions

__all__ = ["RETAIN_HANDLING", "DeadLetter", "Route", "RouteTable"]

RETAIN_HANDLING = {"always": 0, "new_subscription": 1, "never": 2}
"""A route's ``retained`` choice as an MQTT 5 Retain Handling value (lower takes more)."""

_TOPIC_CACHE_SIZE = 4096        # topics remembered ...
_TOPIC_CACHE_CHARS = 1 << 20    # ... holding at most this many characters of topic text
_CACHED_TOPIC_MAX_CHARS = 256   # a longer topic is matched afresh each time: it cannot pin memory


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Where messages a route rejects or cannot deliver go: a Kinesis stream or an MQTT topic."""

    kind: Literal["kinesis", "mqtt"]
    target: str


class _BadJson:
    """A JSON route's payload that cannot be parsed, and why (never quoting the payload)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_BOM = b"\xef\xbb\xbf"


def _decode(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as error:
        return _decode_carefully(payload, error)


def _decode_carefully(payload: bytes, error: ValueError) -> Any:
    """What orjson refused: a UTF-8 byte order mark (ignored, as RFC 8259 lets a parser do) and
    a lone surrogate escape such as \\ud800 (valid JSON text; the standard library parses it) are
    accepted; anything else is rejected saying whether it is not UTF-8 or not JSON."""
    if payload.startswith(_BOM):
        payload = payload[len(_BOM):]
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as again:
            error = again
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as bad:
        return _BadJson(f"payload is not valid UTF-8 (byte {bad.start} starts no UTF-8 character)")
    if "surrogate" in str(error):
        try:
            return json.loads(text)
        except ValueError as again:
            error = again
    if isinstance(error, json.JSONDecodeError):
        return _BadJson(f"payload is not JSON: {error.msg} (line {error.lineno}, column {error.colno})")
    return _BadJson(f"payload is not JSON: {error}")


def _encode(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits: the standard library writes them exactly
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate escape read from the payload: written as one again
            return json.dumps(value, separators=(",", ":")).encode()


def _key_text(value: Any) -> str | None:
    """A partition key's text, or None when the value cannot be one (the caller says why)."""
    if type(value) is str:
        return value
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _encode(value).decode()
    return None


def _key_problem(value: Any, text: str | None) -> tuple[str, str] | None:
    """(reason, code) when the evaluated key cannot be a partition key, else None."""
    if text is None:
        if value is None:
            return "partition key is null (missing field?)", "key_missing"
        kind = "an object" if isinstance(value, dict) else "an array"
        return f"partition key is {kind}, not a string or number", "key_type"
    if not text:
        return "partition key is empty", "key_empty"
    if len(text) > MAX_PARTITION_KEY_CHARS:
        return f"partition key is {len(text)} characters, over the limit of {MAX_PARTITION_KEY_CHARS}", "key_too_long"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "partition key holds a lone surrogate escape (\\ud800-\\udfff), not a character", "key_type"
    return None


def _hash_key_text(value: Any) -> str | None:
    text = str(value) if type(value) is int and value >= 0 else value
    return text if is_hash_key(text) else None


@dataclass(frozen=True, eq=False)
class Route:
    """One validated route. Built only by the loader (or ``RouteTable.legacy``)."""

    name: str
    filters: tuple[str, ...]
    stream: str
    partition_key: Expression
    qos: int = 1
    explicit_hash_key: Expression | None = None
    filter: Expression | None = None
    transform: Expression | None = None
    format: Literal["json", "raw"] = "json"
    append_newline: bool = False
    dead_letter: DeadLetter | None = None
    aggregate: bool = False
    retained: Literal["new_subscription", "always", "never"] = "new_subscription"
    line: int = 0  # where the route starts in its file, for messages

    @property
    def skips_retained(self) -> bool:
        """Some retained copies are not written by this route (counted as skipped)."""
        return self.retained != "always"

    @property
    def definition(self) -> tuple[Any, ...]:
        """What the route does, for comparing two versions of a route file."""

        def text(e: Expression | None) -> str | None:
            return None if e is None else e.source

        return (self.filters, self.stream, text(self.partition_key), self.qos, text(self.explicit_hash_key),
                text(self.filter), text(self.transform), self.format, self.append_newline,
                self.dead_letter, self.aggregate, self.retained)

    @property
    def drop_codes(self) -> tuple[str, ...]:
        """Every reason code a record of this route can be dropped for, so metrics can show each at 0.

        With a dead letter, only a failing dead letter drops; without, whatever rejects or fails.
        """
        if self.dead_letter is not None:
            return ("dead_letter_failed",)
        codes = ["too_large", "rejected_by_kinesis", "ttl_exceeded"]
        if self.format == "json":
            codes.append("not_json")
        if not self.partition_key.is_constant:
            codes += ["key_missing", "key_empty", "key_type", "key_too_long"]
        if self.explicit_hash_key is not None:
            codes.append("hash_key")
        expressions = (self.partition_key, self.explicit_hash_key, self.filter, self.transform)
        if any(e is not None and not e.is_constant for e in expressions):
            codes.append("expression_error")
        return tuple(codes)

    def apply(self, message: Message, document: Any) -> RoutingOutcome:
        """Make this route's record from ``message``; ``document`` is the parsed payload."""
        if self.format == "json" and type(document) is _BadJson:
            return Rejected(self.name, document.reason, "not_json")
        if self.filter is not None and not _truthy(self.filter.evaluate(document)):
            return Skipped(self.name)
        raw_key = self.partition_key.evaluate(document)
        key = _key_text(raw_key)
        problem = _key_problem(raw_key, key)
        if problem is not None:
            return Rejected(self.name, *problem)
        hash_key = None
        if self.explicit_hash_key is not None:
            hash_value = self.explicit_hash_key.evaluate(document)
            hash_key = _hash_key_text(hash_value)
            if hash_key is None:
                return Rejected(self.name, "explicit hash key is not a decimal integer in 0..2^128-1", "hash_key")
        if self.transform is not None:
            data = _encode(self.transform.evaluate(document))
        elif self.format == "json" and message.payload.startswith(_BOM):
            data = message.payload[len(_BOM):]   # not part of the JSON text: no record starts with one
        else:
            data = message.payload
        if self.append_newline:
            data = data + b"\n" if self.transform is not None else _one_line(data, document, self.format)
        assert key is not None  # _key_problem returned None
        return Record(self.name, self.stream, key, data, hash_key, record_size(key, data))


def _one_line(payload: bytes, document: Any, payload_format: str) -> bytes:
    """``append_newline`` for a payload sent as is: exactly one record per line.

    A JSON payload spread over lines (pretty-printed, CRLF) is written compactly first, because
    line readers (Athena's JSON SerDe, DuckDB's read_ndjson) take each line for a record; JSON
    allows a line break only as whitespace, so the compact form says the same. A ``raw`` payload
    is never parsed, so it is only given its newline."""
    ends_with_newline = payload.endswith(b"\n")
    body = payload[:-1] if ends_with_newline else payload
    if payload_format == "json" and (b"\n" in body or b"\r" in body):
        return _encode(document) + b"\n"
    return payload if ends_with_newline else payload + b"\n"


def _truthy(value: Any) -> bool:
    # JMESPath truthiness: false, null, "", [], {} are false; 0 is true.
    return not (value is None or value is False or value == "" or value == [] or value == {})


def _route_filters(route: Route) -> list[tuple[str, Route]]:
    return [(f, route) for f in route.filters]


def _retain_handling(subscriptions: tuple[tuple[str, int], ...], routes: tuple[Route, ...],
                     trie: TopicTrie[Route]) -> dict[str, int]:
    """Subscribed filter -> the lowest Retain Handling of the routes whose filters share a topic
    with it. Sharing, not only covering: with partly overlapping filters a message reaches the
    gateway by whichever subscription's copy is routed, so each must bring what any route wants."""
    choices = {route.retained for route in routes}
    if len(choices) == 1:  # the usual file: one choice for all, no trie walk (a file may hold 70,000 routes)
        value = RETAIN_HANDLING[choices.pop()]
        return {f: value for f, _ in subscriptions}
    return {f: min((RETAIN_HANDLING[r.retained] for r in trie.overlapping(f)), default=1) for f, _ in subscriptions}


_Apply = Callable[[Message, Any], RoutingOutcome]


class _Plan(NamedTuple):
    """Routing for one topic: its routes and, per route, the applier and whether it reads JSON."""

    routes: tuple[Route, ...]
    steps: tuple[tuple[Route, _Apply, bool], ...]
    parses_json: bool     # some route parses the payload: it is parsed once for all of them
    uses_context: bool    # some expression reads the per-message CONTEXT


def _uses_context(route: Route) -> bool:
    expressions = (route.partition_key, route.explicit_hash_key, route.filter, route.transform)
    return any(e is not None and e.uses_context for e in expressions)


def _compile_apply(route: Route) -> _Apply:
    """``route.apply``, specialised at load time for the common shape: no filter, no transform,
    no explicit hash key. Its results are exactly ``route.apply``'s (a property test compares
    them); anything else, and any key that is not a plain short ASCII string, takes
    ``route.apply`` itself."""
    if route.filter is not None or route.transform is not None or route.explicit_hash_key is not None:
        return route.apply
    general = route.apply
    name, stream, key_of = route.name, route.stream, route.partition_key.evaluate
    is_json, newline, fmt = route.format == "json", route.append_newline, route.format
    max_key = MAX_PARTITION_KEY_CHARS
    bom = len(_BOM)
    new_record = partial(tuple.__new__, Record)   # Record(...) without its Python-level __new__

    def apply(message: Message, document: Any) -> RoutingOutcome:
        if is_json and type(document) is _BadJson:
            return Rejected(name, document.reason, "not_json")
        key = key_of(document)
        if type(key) is not str or not 0 < len(key) <= max_key or not key.isascii():
            return general(message, document)
        data = message.payload
        if is_json and data.startswith(_BOM):
            data = data[bom:]
        if newline:   # _one_line, whose common case (no line break anywhere) is inlined
            data = _one_line(data, document, fmt) if b"\n" in data or b"\r" in data else data + b"\n"
        return new_record((name, stream, key, data, None, len(data) + len(key)))

    return apply


@dataclass(frozen=True, eq=False)
class RouteTable:
    """An immutable set of routes plus everything the hot path needs, precomputed."""

    routes: tuple[Route, ...]
    digest: str = ""
    source: str | None = None
    subscriptions: tuple[tuple[str, int], ...] = field(init=False)
    retain_handling: dict[str, int] = field(init=False)
    _trie: TopicTrie[Route] = field(init=False, repr=False)
    _by_name: dict[str, Route] = field(init=False, repr=False)
    _plans: dict[str, _Plan] = field(init=False, repr=False)
    _appliers: dict[int, _Apply] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "_trie", TopicTrie(pair for route in self.routes for pair in _route_filters(route)))
        set_(self, "_by_name", {route.name: route for route in self.routes})
        set_(self, "subscriptions", minimal_subscriptions((f, r.qos) for r in self.routes for f in r.filters))
        set_(self, "retain_handling", _retain_handling(self.subscriptions, self.routes, self._trie))
        set_(self, "_plans", {})
        # Built here, once, so that the hot path does no work that the table already knows.
        set_(self, "_appliers", {id(route): _compile_apply(route) for route in self.routes})

    def get(self, name: str) -> Route | None:
        return self._by_name.get(name)

    def matching(self, topic: str) -> tuple[Route, ...]:
        """Routes whose filters match ``topic``, in file order; memoised per topic (bounded)."""
        return self._plan(topic).routes

    def route(self, message: Message) -> list[RoutingOutcome]:
        """Every outcome for ``message``: one per matching route, in file order."""
        return self.routed(message)[1]

    def routed(self, message: Message) -> tuple[tuple[Route, ...], list[RoutingOutcome]]:
        """The matching routes (as ``matching``) and their outcomes, pairwise, in file order."""
        plan = self._plan(message.topic)
        routes = plan.routes
        if not routes:
            return routes, []
        if plan.uses_context:
            CONTEXT.set(message.topic, message.received_ms, message)
        document = _decode(message.payload) if plan.parses_json else None
        outcomes: list[RoutingOutcome] = []
        retain = message.retain
        for route, apply, is_json in plan.steps:
            if retain and route.retained != "always" and (message.resent or route.retained == "never"):
                outcomes.append(Skipped(route.name, f"retained message (retained: {route.retained})"))
                continue
            try:
                outcomes.append(apply(message, document if is_json else None))
            except ExpressionTooLarge as error:  # the budget of one message (gateway/routing/cost.py)
                outcomes.append(Rejected(route.name, str(error), "expression_too_large"))
            except Exception as error:  # noqa: BLE001 - one poison message must not stop the rest
                # The class name only: jmespath's messages quote the offending payload value.
                outcomes.append(Rejected(route.name, f"expression failed on this payload ({type(error).__name__})",
                                         "expression_error"))
        return routes, outcomes

    def _plan(self, topic: str) -> _Plan:
        """What routing a message on ``topic`` takes: the one memo of the table, bounded in topics
        and in topic length."""
        cached = self._plans.get(topic)
        if cached is not None:
            return cached
        routes = self._trie.match(topic)
        appliers = self._appliers
        plan = _Plan(routes, tuple((r, appliers[id(r)], r.format == "json") for r in routes),
                     any(r.format == "json" for r in routes), any(_uses_context(r) for r in routes))
        if len(topic) <= _CACHED_TOPIC_MAX_CHARS:
            if len(self._plans) >= _TOPIC_CACHE_SIZE:
                self._plans.clear()
            self._plans[topic] = plan
        return plan

    @classmethod
    def legacy(cls, topic: str, stream: str, partition_key: str | None, qos: int) -> RouteTable:
        """The one route of the Go bridge's ``.env``: TOPIC → KIN_STREAM_NAME, a static key."""
        key = partition_key or topic
        literal = compile_expression("`" + json.dumps(key).replace("`", "\\`") + "`")
        route = Route(name="legacy", filters=(topic,), stream=stream, partition_key=literal,
                      qos=min(qos, 1), format="raw")
        digest = hashlib.sha256(f"{topic}\0{stream}\0{key}\0{qos}".encode()).hexdigest()
        return cls(routes=(route,), digest=digest, source=None)
