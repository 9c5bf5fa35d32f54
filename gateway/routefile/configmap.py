"""Route files inside a Kubernetes ConfigMap: find them, and place their findings in the manifest.

Why: the route file of a Kubernetes deployment is written as a ``data`` entry of a ConfigMap
manifest, and that manifest is what people hand to ``validate``. Read as a route file it is
nothing but unknown keys; read as a ConfigMap, each entry whose key ends in ``.yaml`` or ``.yml``
is a route file, and its findings belong on the manifest's own lines, so an editor jumps to them.

Invariant: a finding placed by ``RouteEntry.place`` names the manifest and a line and column inside
the entry's value in the manifest: exact for a literal block scalar (``|``, the usual way to write
one), the start of the value for any other style (whose lines are folded or escaped).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import yaml

from gateway.routefile.findings import Finding
from gateway.routefile.yamlreader import YamlDocument, position

__all__ = ["CONFIGMAP_HINT", "RouteEntry", "is_configmap", "looks_like_configmap", "route_entries"]

CONFIGMAP_HINT = ("this is a Kubernetes ConfigMap, not a route file: mount it as a directory and point "
                  "GATEWAY_ROUTES at its data entry (e.g. routes.yaml); `validate` checks the entries of a ConfigMap")

_KIND = re.compile(r"^kind:\s*['\"]?ConfigMap['\"]?\s*(#.*)?$", re.MULTILINE)
_ROUTE_KEY = re.compile(r".+\.ya?ml$")


def looks_like_configmap(text: str) -> bool:
    """A cheap look at the text before it is parsed: a top-level ``kind: ConfigMap`` line."""
    return _KIND.search(text) is not None


def is_configmap(data: Any) -> bool:
    """``apiVersion: v1`` and ``kind: ConfigMap`` at the top of the document."""
    return isinstance(data, dict) and data.get("apiVersion") == "v1" and data.get("kind") == "ConfigMap"


@dataclass(frozen=True)
class RouteEntry:
    """One ``data`` entry that holds a route file: its key, its text, and where it sits."""

    key: str
    text: str
    node: yaml.ScalarNode
    manifest_lines: tuple[str, ...]

    def place(self, finding: Finding) -> Finding:
        """``finding`` (about the entry's text) moved to the manifest's line and column."""
        start_line, start_column = position(self.node)
        if self.node.style != "|":
            return dataclasses.replace(finding, line=start_line, column=start_column)
        line = start_line + finding.line  # the block's text starts on the line after the '|'
        manifest_line = self.manifest_lines[line - 1] if line <= len(self.manifest_lines) else ""
        own_lines = self.text.split("\n")
        own_line = own_lines[finding.line - 1] if finding.line <= len(own_lines) else ""
        if own_line and manifest_line.endswith(own_line):
            indent = len(manifest_line) - len(own_line)
        else:  # an empty line: the indentation of the block's first line
            first = next((text for text in self.manifest_lines[start_line:] if text.strip()), "")
            indent = len(first) - len(first.lstrip(" "))
        return dataclasses.replace(finding, line=line, column=finding.column + indent)


def route_entries(doc: YamlDocument) -> list[RouteEntry]:
    """The ``data`` entries of a ConfigMap document that are route files, in file order."""
    data = doc.data.get("data") if isinstance(doc.data, dict) else None
    if not isinstance(data, dict):
        return []
    lines = tuple(line.rstrip("\r") for line in doc.text.split("\n"))
    entries = []
    for key, value in data.items():
        located = doc.where.get(("data", key))
        if (_ROUTE_KEY.fullmatch(key) and isinstance(value, str) and located is not None
                and isinstance(located.value, yaml.ScalarNode)):
            entries.append(RouteEntry(key, value, located.value, lines))
    return entries
