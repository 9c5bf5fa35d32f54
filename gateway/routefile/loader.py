"""Route file loader: YAML with positions → JSON Schema → semantic checks → RouteTable.

The pipeline collects every finding before giving up, so one run of ``validate`` shows every
problem of a file. Each finding carries a 1-based line and column found by walking the composed
YAML nodes (never by searching the text): PyYAML composes nodes with marks, and this module
constructs plain JSON-shaped data from those same nodes, remembering which node each value came
from (as Home Assistant's loader does). The JSON Schema step lives in ``schema.py``.

The YAML is read as YAML 1.2 reads it, like the editors do: only ``true``/``false`` are booleans,
``yes``/``no``/``on``/``off`` and bare dates stay strings, and an unquoted ``yes`` where a boolean
is expected is an error rather than a silent surprise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml
from gateway.routefile import checks
from gateway.routefile.findings import Finding, format_path
from gateway.routing.table import RouteTable

__all__ = ["LoadResult", "Located", "check_schema_in_child", "load_routes", "load_routes_text", "load_schema",
           "read_yaml"]

log = logging.getLogger(__name__)

_MAX_NODES = 100_000
_MAX_DEPTH = 64
# YAML 1.1 booleans that YAML 1.2 (and this loader) reads as strings
_AMBIGUOUS = frozenset("y Y yes Yes YES n N no No NO on On ON off Off OFF".split())


@dataclass(frozen=True)
class LoadResult:
    """The table (None when any finding is an error) and every finding, in file order."""

    table: RouteTable | None
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not any(f.is_error for f in self.findings)


class _Resolver(yaml.resolver.BaseResolver):
    """YAML 1.2 core schema: what editors (yaml-language-server) and the JSON world agree on."""

    yaml_implicit_resolvers: dict = {}


for _tag, _pattern, _first in (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
     "-+.0123456789"),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
):
    _Resolver.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))


class _Composer(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, _Resolver):
    """Composes nodes only; construction is ours (``_Builder``) so every value keeps its node."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Resolver.__init__(self)


@dataclass(frozen=True, slots=True)
class Located:
    """Where a value came from: its key node (None for list items and the root) and value node."""

    key: yaml.Node | None
    value: yaml.Node


Path = tuple[str | int, ...]
_STR, _INT, _FLOAT, _BOOL, _NULL = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null"))
_SEQ, _MAP = "tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"


def _pos(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    """Builds JSON-shaped data from composed nodes and records ``path → Located``."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.where: dict[Path, Located] = {}
        self.findings: list[Finding] = []
        self._count = 0
        self._active: set[int] = set()

    def _finding(self, node: yaml.Node, path: Path, rule: str, message: str) -> None:
        line, col = _pos(node)
        self.findings.append(Finding(self.filename, line, col, format_path(path), rule, "error", message))

    def build(self, node: yaml.Node, path: Path, key: yaml.Node | None = None) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise _TooLarge(node)
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
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self._active.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
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

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self._finding(key_node, path, "yaml-syntax", "a mapping key must be a plain value, not a list or mapping")
                continue
            raw = self._scalar(key_node, path)
            key = raw if isinstance(raw, str) else json.dumps(raw)
            if key in first:
                line = first[key].start_mark.line + 1
                self._finding(
                    key_node,
                    path + (key,),
                    "duplicate-key",
                    f"duplicate key '{key}': also defined at line {line}",
                )
                continue
            first[key] = key_node
            result[key] = self.build(value_node, path + (key,), key_node)
        return result


class _TooLarge(Exception):
    def __init__(self, node: yaml.Node) -> None:
        super().__init__("too large")
        self.node = node


@dataclass(frozen=True, slots=True)
class YamlDocument:
    """A parsed file: data (None when unusable), where each value came from, the source text."""

    data: Any
    where: dict[Path, Located]
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


def read_yaml(text: str, filename: str) -> YamlDocument:
    """Compose ``text`` and build JSON-shaped data; every failure becomes a finding."""

    def failed(line: int, col: int, message: str, rule: str = "yaml-syntax") -> YamlDocument:
        return YamlDocument(None, {}, text, (Finding(filename, line, col, "", rule, "error", message),))

    try:
        composer = _Composer(text)
        try:
            node = composer.get_single_node()
        finally:
            composer.dispose()
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
        return failed(*_pos(exc.node), "the document is too large (aliases expand too far)")
    return YamlDocument(data, builder.where, text, tuple(builder.findings))


# --- JSON Schema ------------------------------------------------------------------------------

QOS2_REASON = ("QoS 2 is not supported: acknowledgement waits for Kinesis, and after a crash the broker "
               "resends only PUBREL, so the message would be lost; use qos 1")


def load_schema() -> dict[str, Any]:
    """The route file schema shipped inside the package (identical to schema/routes.schema.json)."""
    text = resources.files("gateway.routefile").joinpath("routes.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


# --- Entry points -----------------------------------------------------------------------------


def _ordered(findings: list[Finding]) -> tuple[Finding, ...]:
    return tuple(sorted(findings, key=lambda f: (f.line, f.column)))


_schema_in_child = False


def check_schema_in_child(enabled: bool = True) -> None:
    """Run the JSON Schema step in a child process from now on (see gateway.routefile.schema)."""
    global _schema_in_child
    _schema_in_child = enabled


def _schema_findings(doc: YamlDocument, text: str, filename: str) -> list[Finding]:
    if _schema_in_child:
        found = _schema_findings_from_child(text, filename)
        if found is not None:
            return found
    from gateway.routefile.schema import schema_findings  # noqa: PLC0415 - kept out of the gateway's memory
    return schema_findings(doc, filename)


def _schema_findings_from_child(text: str, filename: str) -> list[Finding] | None:
    """The child's findings, or None (and one warning) when it could not say."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-m", "gateway.routefile.schema", filename],
                              input=text.encode("utf-8", "surrogatepass"), capture_output=True,
                              env=env, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.decode(errors='replace').strip()[-300:]}")
        return [Finding(**item) for item in json.loads(done.stdout)]
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError, TypeError) as exc:
        log.warning("schema check in a child process failed (%s); checking in this process",
                    " ".join(str(exc).split()))
        return None


def load_routes_text(text: str, filename: str) -> LoadResult:
    """Validate route file ``text`` (named ``filename`` in findings) and build its table."""
    doc = read_yaml(text, filename)
    findings = list(doc.findings)
    if doc.data is None:
        return LoadResult(None, _ordered(findings))
    findings.extend(_schema_findings(doc, text, filename))
    if isinstance(doc.data, dict):
        result = checks.check_routes(doc.data, doc.where, text, filename,
                                     build=not any(f.is_error for f in findings))
        findings.extend(result.findings)
        if result.routes and not any(f.is_error for f in findings):
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            table = RouteTable(routes=tuple(result.routes), digest=digest, source=filename)
            return LoadResult(table, _ordered(findings))
    return LoadResult(None, _ordered(findings))


def load_routes(path: str | os.PathLike[str]) -> LoadResult:
    """Read and validate the route file at ``path``; an unreadable file is a finding, not an error."""
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as handle:
            raw = handle.read()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        message = f"the file is not UTF-8 (byte {exc.start})"
        return LoadResult(None, (Finding(filename, 1, 1, "", "unreadable", "error", message),))
    except OSError as exc:
        message = f"cannot read the file: {exc.strerror or exc}"
        return LoadResult(None, (Finding(filename, 1, 1, "", "unreadable", "error", message),))
    return load_routes_text(text, filename)
