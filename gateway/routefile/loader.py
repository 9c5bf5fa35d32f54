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
from dataclasses import dataclass

from gateway.routefile import checks
from gateway.routefile.findings import Finding
from gateway.routefile.yamlreader import YamlDocument, read_yaml
from gateway.routing.table import RouteTable

__all__ = ["LoadResult", "check_schema_in_child", "load_routes", "load_routes_text"]

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
    from gateway.routefile.schema import schema_findings  # here: jsonschema stays out of the gateway
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
