"""The README and docs/ stay in step with the code and with each other.

The reference lives in docs/: the route keys table in docs/route-file.md must list exactly the
schema's route keys, docs/settings.md every setting the code reads, and every relative link in
README.md, SECURITY.md and docs/*.md must reach an existing file (and, for ``#anchor`` links into
Markdown, an existing heading, by GitHub's slug rules). The README stays a landing page.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The modules whose quoted upper-case names are the settings the gateway reads. Repoint these if
# the settings code moves.
SETTINGS_SOURCES = (
    ROOT / "gateway" / "settings" / "settings.py",
    ROOT / "gateway" / "settings" / "mqtt.py",
    ROOT / "gateway" / "settings" / "environment.py",
    ROOT / "gateway" / "settings" / "spool.py",
)
ROUTE_SCHEMA = ROOT / "schema" / "routes.schema.json"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
ROUTE_FILE_PAGE = DOCS / "route-file.md"
SETTINGS_PAGE = DOCS / "settings.md"
README_MAX_LINES = 200

# Pages linked to that another branch is writing; a link to one passes while the file is absent.
# Remove a name once its page is merged.
PENDING_PAGES = {DOCS / "athena.md"}

# Quoted upper-case strings in the settings modules that are not setting names.
NOT_SETTINGS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "AWS_"}
# Settings documented in docs/settings.md that boto3 reads itself (the gateway never names them).
READ_BY_BOTO3 = {"AWS_ENDPOINT_URL_KINESIS", "AWS_ENDPOINT_URL"}

MARKDOWN_FILES = sorted({README, ROOT / "SECURITY.md", *DOCS.glob("*.md")})
_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (code may hold anything that looks like a link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _section(text: str, heading: str) -> str:
    """The body under a ``## heading`` up to the next heading of that level."""
    assert f"\n{heading}\n" in f"\n{text}", f"no {heading!r} section"
    return f"\n{text}".split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def _setting_names_in_code() -> set[str]:
    """Quoted upper-case strings, less the module's own constants (named in ``__all__``)."""
    names: set[str] = set()
    for source in SETTINGS_SOURCES:
        text = _text(source)
        constants = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*[:=]", text, flags=re.MULTILINE))
        names |= set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', text)) - constants
    return names - NOT_SETTINGS


# --- the reference matches the code ---------------------------------------------------------


def _route_table_keys() -> set[str]:
    section = _section(_text(ROUTE_FILE_PAGE), "## Route keys")
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))


def test_every_route_key_of_the_schema_is_documented_and_nothing_else() -> None:
    schema = json.loads(_text(ROUTE_SCHEMA))
    assert _route_table_keys() == set(schema["$defs"]["route"]["properties"])


def test_every_setting_the_code_reads_is_documented() -> None:
    page = _text(SETTINGS_PAGE)
    missing = sorted(name for name in _setting_names_in_code() if f"`{name}`" not in page)
    assert missing == []


def test_every_documented_setting_is_read_by_the_gateway_or_by_boto3() -> None:
    rows = re.findall(r"^\| (`[A-Z][A-Z0-9_]+`(?:, `[A-Z][A-Z0-9_]+`)*) \|", _text(SETTINGS_PAGE), flags=re.MULTILINE)
    documented = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row)}
    known = _setting_names_in_code() | READ_BY_BOTO3
    # `secret()` reads NAME_FILE for NAME: those names are built, not written out.
    known |= {f"{name}_FILE" for name in known}
    assert sorted(documented - known) == []


# --- the README is a landing page -------------------------------------------------------------


def test_readme_is_at_most_200_lines() -> None:
    assert len(_text(README).splitlines()) <= README_MAX_LINES


def test_quick_start_has_the_demo_and_the_test_command() -> None:
    quick = _section(_text(README), "## Quick start")
    assert "scripts/quickstart demo" in quick and "scripts/quickstart test" in quick
    assert "scripts/quickstart test" in _text(ROOT / ".ci" / "run")


def test_quick_start_says_how_to_run_the_installed_command() -> None:
    quick = _section(_text(README), "## Quick start")
    assert ".venv/bin/mqtt-kinesis-gateway" in quick and "source .venv/bin/activate" in quick


def test_no_page_has_a_placeholder_repository_url() -> None:
    offenders = [path.name for path in MARKDOWN_FILES if "<owner>" in _text(path)]
    assert offenders == []


# --- links and anchors ------------------------------------------------------------------------


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: link and code markup dropped, lower case, punctuation
    other than ``-`` and ``_`` removed, each space a hyphen (runs are not collapsed)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; repeated slugs get -1, -2... as on GitHub."""
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose_lines(_text(path)):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _relative_links(path: Path) -> list[tuple[str, str]]:
    """(link as written, problem) for every relative link in ``path`` that does not resolve."""
    problems = []
    for line in _prose_lines(_text(path)):
        for target in _LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.exists():
                if resolved not in PENDING_PAGES:
                    problems.append((target, "no such file"))
                continue
            if anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append((target, f"no heading with the anchor #{anchor}"))
    return problems


@pytest.mark.parametrize("page", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(page: Path) -> None:
    assert _relative_links(page) == []


@pytest.mark.parametrize(("heading", "slug"), [
    ("The broker's limits are the loss points", "the-brokers-limits-are-the-loss-points"),
    ("QoS 0 vs QoS 1", "qos-0-vs-qos-1"),
    ("/readyz answers 503", "readyz-answers-503"),
    ("Liveness: /healthz", "liveness-healthz"),
    ("Scaling, and why a StatefulSet", "scaling-and-why-a-statefulset"),
    ("1. Region and account", "1-region-and-account"),
    ("`GATEWAY_ROUTES` and [links](x.md)", "gateway_routes-and-links"),
    ("A - B", "a---b"),
])
def test_github_slug_follows_githubs_rules(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A heading\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading) [gone](missing.md) [bad](other.md#nope) [self](#top)\n"
                    "# Top\n```\n[in code](missing-too.md)\n```\n", encoding="utf-8")
    assert _relative_links(page) == [("missing.md", "no such file"),
                                     ("other.md#nope", "no heading with the anchor #nope")]
