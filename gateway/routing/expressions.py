"""JMESPath expressions of the route file, compiled once at load time.

Three things happen here that jmespath itself does not do:

* the gateway functions ``topic()``, ``topic(`n`)``, ``uuid()`` and ``timestamp()`` mirror AWS IoT
  rule templates, so users' habits carry over; ``qos()``, ``retained()``, ``content_type()``,
  ``user_property(name)`` and ``user_properties()`` expose the MQTT metadata that a Kinesis record
  has no header for, so a ``transform`` can carry it in the record data (docs/athena.md);
* ``jmespath.compile`` accepts unknown function names and wrong argument counts (they fail only
  when evaluated), so the parsed tree is checked against the function table here, at load time;
* the common shapes are specialised: a literal is a constant, a field path such as ``name`` or
  ``a.b.c`` becomes a chain of ``dict.get`` (property-tested against jmespath itself), and
  ``topic(`n`)`` becomes an index into the topic's levels. Only the rest goes through the
  generic interpreter.

The per-message context (topic, receipt time, the message's MQTT metadata) reaches the functions
through a thread-local, set once per message by the route table: routing runs on one thread at a
time per table user.
"""

from __future__ import annotations

import threading
import time
import uuid as _uuid
import warnings
from collections.abc import Callable
from typing import Any, Literal

import jmespath
from jmespath import exceptions as jmespath_errors
from jmespath import functions as jmespath_functions

from gateway.routing import cost

__all__ = ["GATEWAY_FUNCTIONS", "EvalContext", "Expression", "ExpressionError", "compile_expression"]


class ExpressionError(ValueError):
    """A route expression that cannot be compiled; ``offset`` is the 0-based character, if known."""

    def __init__(self, message: str, offset: int | None = None,
                 kind: Literal["syntax", "function", "nesting"] = "syntax") -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.kind = kind


class EvalContext(threading.local):
    """What the gateway functions see of the message being routed."""

    topic: str = ""
    levels: list[str] = []  # noqa: RUF012 - per-thread value, replaced per message
    received_ms: int = 0
    message: Any = None  # the gateway.model.Message being routed, for its MQTT metadata

    def set(self, topic: str, received_ms: int, message: Any = None) -> None:
        self.topic = topic
        self.levels = topic.split("/")
        self.received_ms = received_ms
        self.message = message


CONTEXT = EvalContext()

# name -> (minimum, maximum) argument count
GATEWAY_FUNCTIONS: dict[str, tuple[int, int]] = {
    "topic": (0, 1), "uuid": (0, 0), "timestamp": (0, 0),
    "qos": (0, 0), "retained": (0, 0), "content_type": (0, 0), "user_property": (1, 1), "user_properties": (0, 0),
}
_METADATA_FUNCTIONS = frozenset({"qos", "retained", "content_type", "user_property", "user_properties"})


def _topic_level(n: Any) -> str | None:
    if isinstance(n, bool) or not isinstance(n, int | float) or int(n) != n or n == 0:
        raise jmespath_errors.JMESPathTypeError("topic", n, type(n).__name__, ["non-zero integer"])
    levels = CONTEXT.levels
    index = int(n) - 1 if n > 0 else int(n)
    if -len(levels) <= index < len(levels):
        return levels[index]
    return None


def _metadata(function_name: str, resolved_args: list[Any]) -> Any:
    """The MQTT metadata functions. Without a message (no routing in progress) each is null.

    A user property sent more than once (MQTT 5 allows it) has its last value, in both
    ``user_property(name)`` and ``user_properties()``."""
    message = CONTEXT.message
    if function_name == "user_property":
        name = resolved_args[0]
        if not isinstance(name, str):
            raise jmespath_errors.JMESPathTypeError("user_property", name, type(name).__name__, ["string"])
        if message is None:
            return None
        found = None
        for key, value in message.user_properties:
            if key == name:
                found = value
        return found
    if message is None:
        return None
    if function_name == "qos":
        return message.qos
    if function_name == "retained":
        return bool(message.retain)
    if function_name == "content_type":
        return message.content_type
    return dict(message.user_properties)  # user_properties


class _GatewayFunctions(jmespath_functions.Functions):
    """jmespath's built-ins plus the gateway functions (arity is checked at load time)."""

    def call_function(self, function_name: str, resolved_args: list[Any]) -> Any:
        if function_name == "topic":
            return CONTEXT.topic if not resolved_args else _topic_level(resolved_args[0])
        if function_name == "uuid":
            return str(_uuid.uuid4())
        if function_name == "timestamp":
            return CONTEXT.received_ms or int(time.time() * 1000)
        if function_name in _METADATA_FUNCTIONS:
            return _metadata(function_name, resolved_args)
        return super().call_function(function_name, resolved_args)


_OPTIONS = jmespath.Options(custom_functions=_GatewayFunctions())
_BUILTIN_TABLE = jmespath_functions.Functions.FUNCTION_TABLE
_PAYLOAD_NODES = frozenset(
    {"field", "current", "identity", "index", "index_expression", "slice", "flatten",
     "projection", "value_projection", "filter_projection"}
)


def _arity(name: str) -> tuple[int, int | None] | None:
    if name in GATEWAY_FUNCTIONS:
        return GATEWAY_FUNCTIONS[name]
    spec = _BUILTIN_TABLE.get(name)
    if spec is None:
        return None
    signature = spec["signature"]
    if signature and signature[-1].get("variadic"):
        return len(signature), None
    return len(signature), len(signature)


def _walk(node: dict[str, Any]):  # type: ignore[no-untyped-def]
    yield node
    for child in node.get("children", ()):
        if isinstance(child, dict):
            yield from _walk(child)


def _nth_call(source: str, name: str, n: int) -> int | None:
    """Offset of the n-th (0-based) ``name(`` in ``source``: the AST carries no positions, and a
    pre-order walk meets calls in the order they are written."""
    offset = -1
    for _ in range(n + 1):
        offset = source.find(name + "(", offset + 1)
        if offset < 0:
            return None
    return offset


def _check_functions(source: str, parsed: dict[str, Any]) -> None:
    seen: dict[str, int] = {}
    for node in _walk(parsed):
        if node.get("type") != "function_expression":
            continue
        name, count = node["value"], len(node.get("children", ()))
        offset = _nth_call(source, name, seen.get(name, 0))
        seen[name] = seen.get(name, 0) + 1
        arity = _arity(name)
        if arity is None:
            known = ", ".join(sorted(set(_BUILTIN_TABLE) | set(GATEWAY_FUNCTIONS)))
            raise ExpressionError(f"unknown function {name}() (known: {known})", offset, "function")
        low, high = arity
        if count < low or (high is not None and count > high):
            expected = f"{low}" if low == high else f"{low} to {high}" if high is not None else f"at least {low}"
            raise ExpressionError(f"function {name}() takes {expected} argument(s), got {count}", offset, "function")


def _check_nesting(source: str, parsed: dict[str, Any]) -> None:
    """Refuse what could grow each message's output exponentially (gateway/routing/cost.py)."""
    depth, first_too_deep = cost.deepest_nesting(parsed)
    if depth > cost.MAX_NESTING:
        offset = _nth_call(source, *first_too_deep) if first_too_deep is not None else None
        raise ExpressionError(f"function calls, lists and objects nest {depth} levels deep; at most {cost.MAX_NESTING}"
                              " are allowed, since each level can double the output of every message",
                              offset, "nesting")


def _field_path(parsed: dict[str, Any]) -> tuple[str, ...] | None:
    if parsed["type"] == "field":
        return (parsed["value"],)
    if parsed["type"] == "subexpression":
        keys: list[str] = []
        for child in parsed["children"]:
            sub = _field_path(child)
            if sub is None:
                return None
            keys.extend(sub)
        return tuple(keys)
    return None


def _path_getter(keys: tuple[str, ...]) -> Callable[[Any], Any]:
    if len(keys) == 1:
        (key,) = keys

        def get_one(document: Any) -> Any:
            return document.get(key) if type(document) is dict else None

        return get_one

    def get_path(document: Any) -> Any:
        for key in keys:
            if type(document) is not dict:
                return None
            document = document.get(key)
        return document

    return get_path


class Expression:
    """A compiled route expression. ``evaluate`` is what the hot path calls."""

    __slots__ = ("evaluate", "is_constant", "references_payload", "source", "uses_context")

    def __init__(self, source: str, parsed: dict[str, Any], compiled: Any) -> None:
        self.source = source
        self.references_payload = any(n.get("type") in _PAYLOAD_NODES for n in _walk(parsed))
        self.is_constant = parsed["type"] == "literal"
        # Reads the per-message CONTEXT (topic, receipt time, MQTT metadata): only then must the
        # router set it for each message.
        self.uses_context = any(n.get("type") == "function_expression" and n.get("value") in GATEWAY_FUNCTIONS
                                for n in _walk(parsed))
        self.evaluate: Callable[[Any], Any] = self._specialise(parsed, compiled)

    @staticmethod
    def _specialise(parsed: dict[str, Any], compiled: Any) -> Callable[[Any], Any]:
        if parsed["type"] == "literal":
            value = parsed["value"]
            return lambda _document: value
        keys = _field_path(parsed)
        if keys is not None:
            return _path_getter(keys)
        if parsed["type"] == "function_expression" and parsed["value"] == "topic":
            args = parsed["children"]
            if not args:
                return lambda _document: CONTEXT.topic
            if args[0]["type"] == "literal":
                level = args[0]["value"]
                return lambda _document: _topic_level(level)
        check_output = cost.may_grow(parsed)  # within a budget per message: see gateway/routing/cost.py
        return lambda document: cost.evaluate(parsed, document, _OPTIONS, check_output=check_output)

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Expression) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


def compile_expression(source: str) -> Expression:
    """Compile and check ``source``; raise ExpressionError with the offending character's offset."""
    if not isinstance(source, str) or not source.strip():
        raise ExpressionError("an expression must be a non-empty string", 0)
    try:
        with warnings.catch_warnings():  # `bare` literals are deprecated but still JMESPath
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            compiled = jmespath.compile(source)
    except jmespath_errors.LexerError as error:
        raise ExpressionError(f"invalid JMESPath: {error.message}", error.lexer_position) from None
    except jmespath_errors.ParseError as error:
        token = error.token_value
        detail = "unexpected end of expression" if token is None or token == "" else f"unexpected {token!r}"
        raise ExpressionError(f"invalid JMESPath: {detail}", error.lex_position) from None
    except jmespath_errors.JMESPathError as error:  # pragma: no cover - defensive
        raise ExpressionError(f"invalid JMESPath: {error}", None) from None
    _check_functions(source, compiled.parsed)
    _check_nesting(source, compiled.parsed)
    return Expression(source, compiled.parsed, compiled)
