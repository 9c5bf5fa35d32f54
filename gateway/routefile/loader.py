"""Route file loader: YAML with positions → JSON Schema → semantic checks → RouteTable.

The pipeline collects every finding before giving up, so one run of ``validate`` shows every
problem of a file. The YAML step (with the line and column of every value) lives in
``yamlreader.py``, the JSON Schema step in ``schema.py`` (imported only when it runs, or run in a
child process), the semantic checks in ``checks.py``.

Invariant: loading never raises for any input; whatever is wrong is a finding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass

from gateway.routefile import checks
from gateway.routefile.configmap import CONFIGMAP_HINT, is_configmap
from gateway.routefile.findings import Finding
from gateway.routefile.readfile import RouteFileError, read_route_file
from gateway.routefile.yamlreader import YamlDocument, collector_paused, position, read_yaml
from gateway.routing.table import RouteTable

__all__ = ["LoadResult", "check_schema_in_child", "load_routes", "load_routes_bytes", "load_routes_text"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadResult:
    """The table (None when any finding is an error) and every finding, in file order."""

    table: RouteTable | None
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not any(f.is_error for f in self.findings)


def _ordered(findings: list[Finding]) -> tuple[Finding, ...]:
    """File order, each finding once (two steps may see the same problem)."""
    return tuple(sorted(dict.fromkeys(findings), key=lambda f: (f.line, f.column)))


_schema_in_child = False
_CHILD_TIMEOUT_S = 300  # a file at the size limit takes about a minute; past this, check here instead


def check_schema_in_child(enabled: bool = True) -> None:
    """Run the JSON Schema step in a child process from now on (see gateway.routefile.schema)."""
    global _schema_in_child
    _schema_in_child = enabled


class _SchemaInChild:
    """The schema step in a child process, started before this process reads the YAML, so the two
    read it at the same time (a file of 71,000 routes takes seconds to read)."""

    def __init__(self, text: str, filename: str) -> None:
        self._found: list[Finding] | None = None
        self._thread = threading.Thread(target=self._run, args=(text, filename), name="schema-check", daemon=True)
        self._thread.start()

    def _run(self, text: str, filename: str) -> None:
        self._found = _schema_findings_from_child(text, filename)

    def findings(self) -> list[Finding] | None:
        self._thread.join()
        return self._found


def _schema_findings(doc: YamlDocument, filename: str, child: _SchemaInChild | None) -> list[Finding]:
    if child is not None:
        found = child.findings()
        if found is not None:
            return found
    from gateway.routefile.schema import schema_findings  # noqa: PLC0415 - jsonschema stays out of the gateway
    return schema_findings(doc, filename)


def _schema_findings_from_child(text: str, filename: str) -> list[Finding] | None:
    """The child's findings, or None (and one warning) when it could not say."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-m", "gateway.routefile.schema", filename],  # noqa: S603 - ours
                              input=text.encode("utf-8", "surrogatepass"), capture_output=True,
                              env=env, timeout=_CHILD_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.decode(errors='replace').strip()[-300:]}")
        return [Finding(**item) for item in json.loads(done.stdout)]
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError, TypeError) as exc:
        log.warning("schema check in a child process failed (%s); checking in this process",
                    " ".join(str(exc).split()))
        return None


def load_routes_text(text: str, filename: str, *, digest: str | None = None) -> LoadResult:
    """Validate route file ``text`` (named ``filename`` in findings) and build its table.

    ``digest`` is the table's sha256, by default of ``text`` in UTF-8; ``load_routes_bytes`` passes
    the digest of the bytes it was given, so a reloader's digest and the table's are one value.
    """
    with collector_paused():
        return _load(text, filename, digest)


def _load(text: str, filename: str, digest: str | None) -> LoadResult:
    child = _SchemaInChild(text, filename) if _schema_in_child else None
    doc = read_yaml(text, filename)
    findings = list(doc.findings)
    if doc.data is None:
        return LoadResult(None, _ordered(findings))
    if is_configmap(doc.data):  # not a route file, but one holding route files: say so, once
        located = doc.where.get(("kind",))
        line, column = position(located.value) if located is not None else (1, 1)
        return LoadResult(None, (Finding(filename, line, column, "kind", "configmap", "error", CONFIGMAP_HINT),))
    findings.extend(_schema_findings(doc, filename, child))
    if isinstance(doc.data, dict):
        result = checks.check_routes(doc.data, doc.where, text, filename,
                                     build=not any(f.is_error for f in findings))
        del doc  # the nodes and their positions are half the memory a load takes: free them first
        findings.extend(result.findings)
        if result.routes and not any(f.is_error for f in findings):
            if digest is None:
                digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
            table = RouteTable(routes=tuple(result.routes), digest=digest, source=filename)
            return LoadResult(table, _ordered(findings))
    return LoadResult(None, _ordered(findings))


def load_routes_bytes(raw: bytes, filename: str) -> LoadResult:
    """Validate the bytes of a route file (UTF-8, a byte order mark allowed); the table's digest is
    the sha256 of exactly these bytes."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return _unreadable(filename, f"the file is not UTF-8 (byte {exc.start})")
    return load_routes_text(text, filename, digest=hashlib.sha256(raw).hexdigest())


def load_routes(path: str | os.PathLike[str]) -> LoadResult:
    """Read and validate the route file at ``path``; an unreadable file is a finding, not an error."""
    filename = os.fspath(path)
    try:
        raw = read_route_file(filename)
    except RouteFileError as exc:
        return _unreadable(filename, exc.message)
    return load_routes_bytes(raw, filename)


def _unreadable(filename: str, message: str) -> LoadResult:
    return LoadResult(None, (Finding(filename, 1, 1, "", "unreadable", "error", message),))
