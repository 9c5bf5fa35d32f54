"""Findings and the reporters that render them.

A *finding* is one thing the loader has to say about a route file: where (file, 1-based line and
column, JSON path), which rule, how serious, and a one-line message. The loader only collects
findings; *reporters* (chosen by name from ``REPORTERS``) render a batch of them for a person
(``text``), a program (``json``) or GitHub Actions annotations (``github``). Findings go to
``out``; summaries and diagnostics go to ``err`` so that machine formats stay parseable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TextIO

__all__ = [
    "REPORTERS",
    "FileReport",
    "Finding",
    "Reporter",
    "format_path",
    "report_github",
    "report_json",
    "report_text",
    "summary_line",
]

Severity = Literal["error", "warning", "info"]


def format_path(path: Sequence[str | int]) -> str:
    """``routes[0].partition_key`` style, quoting keys that are not plain identifiers."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part, ensure_ascii=False)}]"
    return text


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem (severity "error"), risk ("warning") or remark ("info") about one place in a file."""

    file: str
    line: int
    column: int
    path: str
    rule: str
    severity: Severity
    message: str

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def format_text(self) -> str:
        """The GCC/Ruff style line that editors and terminals make clickable."""
        return f"{self.file}:{self.line}:{self.column}: {self.message} [{self.rule}]"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "rule": self.rule,
            "severity": self.severity,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class FileReport:
    """What a reporter knows about one checked file: its findings and, when valid, its size."""

    file: str
    findings: tuple[Finding, ...]
    routes: int | None = None

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.is_error)

    @property
    def valid(self) -> bool:
        return self.errors == 0


Reporter = Callable[[Sequence[FileReport], TextIO, TextIO], None]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def summary_line(reports: Sequence[FileReport]) -> list[str]:
    """Lines for stderr: one per valid file, then the error count when there are errors."""
    lines: list[str] = []
    for report in reports:
        if report.valid:
            text = f"{report.file}: valid"
            if report.routes is not None:
                text += f", {_plural(report.routes, 'route')}"
            notes = len(report.findings)
            if notes:
                text += f", {_plural(notes, 'note')}"
            lines.append(text)
    errors = sum(r.errors for r in reports)
    if errors:
        bad_files = sum(1 for r in reports if not r.valid)
        lines.append(f"{_plural(errors, 'error')} in {_plural(bad_files, 'file')}")
    return lines


def report_text(reports: Sequence[FileReport], out: TextIO, err: TextIO) -> None:
    """``path:line:col: message [rule]`` per finding on ``out``; the summary on ``err``."""
    for report in reports:
        out.writelines(finding.format_text() + "\n" for finding in report.findings)
    err.writelines(line + "\n" for line in summary_line(reports))


def report_json(reports: Sequence[FileReport], out: TextIO, err: TextIO) -> None:
    """One JSON object and nothing else on ``out``; new fields may be added later."""
    document = {
        "valid": all(r.valid for r in reports),
        "errors": [f.as_dict() for r in reports for f in r.findings],
    }
    out.write(json.dumps(document, ensure_ascii=False) + "\n")


def _escape_data(text: str) -> str:
    # actions/toolkit packages/core/src/command.ts escapeData
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    # actions/toolkit packages/core/src/command.ts escapeProperty
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def report_github(reports: Sequence[FileReport], out: TextIO, err: TextIO) -> None:
    """GitHub Actions workflow commands: ``::error``, ``::warning``, and info findings as ``::notice``.

    GitHub shows only the first ten annotations of each kind per step, so the plain summary
    follows on ``err``.
    """
    for report in reports:
        for f in report.findings:
            command = "error" if f.is_error else "warning" if f.severity == "warning" else "notice"
            props = ",".join(
                f"{name}={_escape_property(str(value))}"
                for name, value in (
                    ("file", f.file),
                    ("line", f.line),
                    ("col", f.column),
                    ("title", f.rule),
                )
            )
            out.write(f"::{command} {props}::{_escape_data(f.message)}\n")
    err.writelines(line + "\n" for line in summary_line(reports))


REPORTERS: Mapping[str, Reporter] = {
    "text": report_text,
    "json": report_json,
    "github": report_github,
}
