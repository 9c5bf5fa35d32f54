"""Property-based fuzzing: no YAML text or route document makes the CLI raise or exit oddly.

Both strategies go through ``main([...])`` exactly as a user would, so a crash anywhere in the
loader, the checks or a reporter shows up as an exit code of 2 with "internal error".
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "routes.example.yaml"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _validate(workdir: Path, text: str) -> None:
    path = workdir / "routes.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    for fmt in ("text", "json", "github"):
        code, out, err = _run(["validate", "--format", fmt, str(path)])
        assert "internal error" not in err and "Traceback" not in err, err
        assert code in (0, 1, 2)
        if fmt == "json":
            assert json.loads(out)["valid"] is (code == 0)


# --- raw YAML text ----------------------------------------------------------------------------

_FRAGMENTS = st.sampled_from([
    "version: 1\n", "routes:\n", "  - name: a\n", "    topic: a/#\n", "    stream: s\n",
    "    partition_key: name\n", "defaults:\n", "  qos: 2\n", "    qos: 1\n", "    format: raw\n",
    "    aggregate: yes\n", "    dead_letter: {topic: a/b}\n", "- ", ": ", "&a ", "*a", "!!binary ",
    "[", "]", "{", "}", ",", "'", '"', "`", "#", "|\n", ">-\n", "\t", "\n", "  ", "? ", "---\n", "...\n",
    "%YAML 1.2\n", "2024-01-01", "0x1F", "0o17", ".inf", "~", "null", "on", "topic(`3`)", "$share/g/x",
    "\u00e9", "\ufeff", "\x85", "\x00",
])


@FUZZ
@given(st.lists(_FRAGMENTS | st.text(max_size=8), max_size=30).map("".join))
def test_any_yaml_text_gives_findings_not_tracebacks(workdir: Path, text: str) -> None:
    _validate(workdir, text)


# --- route documents (dicts dumped to YAML) -----------------------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(allow_nan=True),
    st.sampled_from(["", "a/#", "a/+/b", "#", "+", "a/#/b", "$share/g/a", "$SYS/x", "name", "topic(`3`)",
                     "topic(`-1`)", "`k`", "''", "foo(", "nope(a)", "uuid(`1`)", "a.[b", "yes", "raw", "json",
                     "arn:aws:kinesis:eu-west-1:123456789012:stream/s", "arn:aws:kinesis:x:1:stream/s",
                     "s" * 129, "stream-1", "`340282366920938463463374607431768211456`", "a || ]"]),
    st.text(max_size=10),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["stream", "topic", "x"]) | st.text(max_size=4), inner, max_size=3), max_leaves=6)
_KEYS = ["name", "topic", "stream", "partition_key", "explicit_hash_key", "qos", "filter", "transform",
         "format", "append_newline", "dead_letter", "aggregate", "bogus"]
_routes = st.dictionaries(st.sampled_from(_KEYS), _values, max_size=8)
_documents = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 2, "1"]), "routes": st.lists(_routes | _values, max_size=4)},
    optional={"defaults": _routes | _values, "extra": _values},
)


@FUZZ
@given(_documents)
def test_any_route_document_gives_findings_not_tracebacks(workdir: Path, document: dict[str, Any]) -> None:
    _validate(workdir, yaml.safe_dump(document, allow_unicode=True, sort_keys=False))


_well_formed = st.fixed_dictionaries({
    "name": st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True),
    "topic": st.lists(st.sampled_from(["a", "b", "+", "#", "$SYS"]), min_size=1, max_size=4).map("/".join),
    "stream": st.sampled_from(["s1", "s2"]),
    "partition_key": st.sampled_from(["name", "topic(`2`)", "`k`", "a.b", "uuid()"]),
}, optional={"qos": st.sampled_from([0, 1]), "format": st.sampled_from(["json", "raw"]),
             "append_newline": st.booleans(), "dead_letter": st.sampled_from([{"stream": "dl"}, {"topic": "dead/x"}])})


@FUZZ
@given(st.lists(_well_formed, min_size=1, max_size=5), st.text(max_size=20), st.binary(max_size=40))
def test_well_formed_documents_validate_and_explain_without_crashing(
    workdir: Path, routes: list[dict[str, Any]], topic: str, payload: bytes
) -> None:
    path = workdir / "routes.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "routes": routes}), encoding="utf-8")
    code, _, err = _run(["validate", str(path)])
    assert code in (0, 1) and "internal error" not in err
    payload_file = workdir / "payload.bin"
    payload_file.write_bytes(payload)
    code, out, err = _run(["explain", str(path), "--topic", topic or "a", "--payload-file", str(payload_file)])
    assert code in (0, 1, 2) and "internal error" not in err, err
    for line in out.splitlines():
        assert "route" in json.loads(line)
