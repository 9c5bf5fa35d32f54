"""YAML with positions: composed nodes → JSON-shaped data, and where every value came from.

Every later step (the JSON Schema mapping in ``schema.py``, the semantic checks in ``checks.py``)
places its findings through the ``where`` map built here, so a finding's 1-based line and column are
found by walking the composed YAML nodes, never by searching the text. PyYAML composes nodes with
marks; this module constructs plain data from those same nodes and remembers which node each value
came from (as Home Assistant's loader does).

The YAML is read as YAML 1.2 reads it, like the editors do: only ``true``/``false`` are booleans,
``yes``/``no``/``on``/``off`` and bare dates stay strings (``YAML_1_1_BOOLEANS`` names the words a
reader may mean as booleans, so the schema step can say so).

Invariant: ``read_yaml`` never raises for any text; every failure is a finding with a line and
column of at least 1.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from gateway.routefile.findings import Finding, format_path

__all__ = ["YAML_1_1_BOOLEANS", "JsonPath", "Located", "YamlDocument", "collector_paused", "is_plain", "position",
           "read_yaml"]

JsonPath = tuple[str | int, ...]
"""Where a value sits in the data: ``("routes", 0, "topic")``."""

#: YAML 1.1 booleans that YAML 1.2 (and this reader) reads as strings.
YAML_1_1_BOOLEANS = frozenset(["y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO",
                               "on", "On", "ON", "off", "Off", "OFF"])

_MAX_DEPTH = 64
#: Nodes aliases may make the builder visit again: a "billion laughs" document stops here. Nodes
#: written out in the file do not count: the size limit of the file bounds those.
_MAX_ALIAS_EXPANSION = 100_000
_STR, _INT, _FLOAT, _BOOL, _NULL = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null"))
_SEQ, _MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"


class _Resolver(yaml.resolver.BaseResolver):
    """YAML 1.2 core schema: what editors (yaml-language-server) and the JSON world agree on."""

    yaml_implicit_resolvers: dict[str, Any] = {}  # noqa: RUF012 - PyYAML's class-level registry


for _tag, _pattern, _first in (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
     "-+.0123456789"),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
):
    _Resolver.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))


class _PyComposer(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, _Resolver):
    """Composes nodes only; construction is ours (``_Builder``) so every value keeps its node."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Resolver.__init__(self)


# libyaml's parser, when PyYAML was built with it; else the pure-Python composer does the same, slower.
_CParser: Any = getattr(getattr(yaml, "cyaml", None), "CParser", None)

if _CParser is not None:
    class _CComposer(_CParser, _Resolver):
        """libyaml's composer (15 times faster on a big file), with the same resolver and the same marks."""

        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            _Resolver.__init__(self)


@dataclass(frozen=True, slots=True)
class Located:
    """Where a value came from: its key node (None for list items and the root) and value node."""

    key: yaml.Node | None
    value: yaml.Node


def position(node: yaml.Node) -> tuple[int, int]:
    """The 1-based line and column where ``node`` starts."""
    return node.start_mark.line + 1, node.start_mark.column + 1


class _TooLarge(Exception):
    def __init__(self, node: yaml.Node) -> None:
        super().__init__("too large")
        self.node = node


class _Builder:
    """Builds JSON-shaped data from composed nodes and records ``path → Located``."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.where: dict[JsonPath, Located] = {}
        self.findings: list[Finding] = []
        self._built: set[int] = set()
        self._expanded = 0
        self._active: set[int] = set()

    def _finding(self, node: yaml.Node, path: JsonPath, rule: str, message: str) -> None:
        line, col = position(node)
        self.findings.append(Finding(self.filename, line, col, format_path(path), rule, "error", message))

    def build(self, node: yaml.Node, path: JsonPath, key: yaml.Node | None = None) -> Any:
        if id(node) in self._built:  # reached again through an alias
            self._expanded += 1
            if self._expanded > _MAX_ALIAS_EXPANSION:
                raise _TooLarge(node)
        else:
            self._built.add(id(node))
        self.where.setdefault(path, Located(key, node))
        if id(node) in self._active:
            self._finding(node, path, "yaml-syntax", "an alias refers to a node that contains it")
            return None
        if len(path) > _MAX_DEPTH:
            self._finding(node, path, "yaml-syntax", f"nesting deeper than {_MAX_DEPTH} levels")
            return None
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if node.tag not in (_SEQ, _MAP):
            self._finding(node, path, "yaml-syntax", f"the YAML tag {node.tag} is not supported in a route file")
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self._active.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, path: JsonPath) -> Any:
        text, tag = node.value, node.tag
        if tag == _STR:
            return text
        if tag == _NULL:
            return None
        if tag == _BOOL:
            return text.lower() == "true"
        if tag == _INT:
            if text.startswith(("0o", "0x")):
                return int(text[2:], 8 if text[1] == "o" else 16)
            return int(text, 10)
        if tag == _FLOAT:
            lowered = text.lower()
            if lowered.endswith(".nan"):
                return float("nan")
            if lowered.endswith(".inf"):
                return float("-inf") if text.startswith("-") else float("inf")
            return float(text)
        self._finding(node, path, "yaml-syntax", f"the YAML tag {tag} is not supported in a route file")
        return text

    def _mapping(self, node: yaml.MappingNode, path: JsonPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self._finding(key_node, path, "yaml-syntax",
                              "a mapping key must be a plain value, not a list or mapping")
                continue
            raw = self._scalar(key_node, path)
            key = raw if isinstance(raw, str) else json.dumps(raw)
            if key in first:
                line = first[key].start_mark.line + 1
                self._finding(key_node, (*path, key), "duplicate-key",
                              f"duplicate key '{key}': also defined at line {line}")
                continue
            first[key] = key_node
            result[key] = self.build(value_node, (*path, key), key_node)
        return result


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """A parsed file: data (None when unusable), where each value came from, the source text."""

    data: Any
    where: dict[JsonPath, Located]
    text: str
    findings: tuple[Finding, ...]


def _yaml_error(filename: str, exc: yaml.MarkedYAMLError) -> Finding:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    parts = [p for p in (exc.context, exc.problem) if p]
    message = "; ".join(str(p) for p in parts) or "invalid YAML"
    if exc.context_mark is not None and exc.problem_mark is not None and exc.context:
        message = f"{exc.problem} ({exc.context} at line {exc.context_mark.line + 1})"
    return Finding(filename, line, col, "", "yaml-syntax", "error", message)


def _compose(text: str) -> yaml.Node | None:
    if _CParser is None:
        return _compose_with(_PyComposer, text)
    try:
        return _compose_with(_CComposer, text)
    except UnicodeEncodeError:  # a lone surrogate, which libyaml cannot be handed: let PyYAML say where
        return _compose_with(_PyComposer, text)
    except yaml.reader.ReaderError as exc:  # libyaml counts UTF-8 bytes; findings count characters
        exc.position = len(text.encode("utf-8")[: exc.position].decode("utf-8", "ignore"))
        raise


def _compose_with(make: Callable[[str], Any], text: str) -> yaml.Node | None:
    composer = make(text)
    try:
        with collector_paused():
            node: yaml.Node | None = composer.get_single_node()
        return node
    finally:
        composer.dispose()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for building the nodes and tables of a route file.

    A file of 71,000 routes makes millions of objects and almost no cycles; the collector would
    rescan them again and again, which doubles the time a load takes. Whatever cycles a load does
    make are collected when it ends. Nested uses and a collector already off are left alone.
    """
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def read_yaml(text: str, filename: str) -> YamlDocument:
    """Compose ``text`` and build JSON-shaped data; every failure becomes a finding."""

    def failed(line: int, col: int, message: str, rule: str = "yaml-syntax") -> YamlDocument:
        return YamlDocument(None, {}, text, (Finding(filename, line, col, "", rule, "error", message),))

    try:
        node = _compose(text)
    except yaml.MarkedYAMLError as exc:
        return YamlDocument(None, {}, text, (_yaml_error(filename, exc),))
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, e.g. NUL
        before = text[: exc.position]
        return failed(before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1,
                      f"the character U+{exc.character:04X} is not allowed in YAML" if isinstance(exc.character, int)
                      else "a character that is not allowed in YAML")
    except yaml.YAMLError as exc:
        return failed(1, 1, (str(exc).splitlines() or ["invalid YAML"])[0])
    except RecursionError:
        return failed(1, 1, "the YAML is nested too deeply")
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL):
        return failed(1, 1, "the file is empty: expected 'version: 1' and 'routes:'", "schema")
    builder = _Builder(filename)
    try:
        data = builder.build(node, ())
    except _TooLarge as exc:
        return failed(*position(exc.node), "the document is too large (aliases expand too far)")
    return YamlDocument(data, builder.where, text, tuple(builder.findings))


def is_plain(node: yaml.Node) -> bool:
    """True for a scalar written without quotes or block indicators (libyaml says "", PyYAML None)."""
    return isinstance(node, yaml.ScalarNode) and not node.style
