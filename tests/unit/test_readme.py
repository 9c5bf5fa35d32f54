"""The README's reference stays in step with the schema and the settings the code reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
NOT_SETTINGS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "AWS_"}


def _route_table_keys() -> set[str]:
    section = README.split("## The route file", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))


def test_every_route_key_of_the_schema_is_documented_and_nothing_else() -> None:
    schema = json.loads((ROOT / "schema" / "routes.schema.json").read_text(encoding="utf-8"))
    keys = set(schema["$defs"]["route"]["properties"])
    assert _route_table_keys() == keys


def test_every_setting_the_code_reads_is_documented() -> None:
    source = (ROOT / "gateway" / "settings" / "settings.py").read_text(encoding="utf-8")
    names = set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', source)) - NOT_SETTINGS
    missing = sorted(name for name in names if f"`{name}`" not in README)
    assert missing == []


def test_quick_start_has_the_demo_and_the_test_command() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "scripts/quickstart demo" in quick and "scripts/quickstart test" in quick
    assert "scripts/quickstart test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
