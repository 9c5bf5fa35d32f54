"""Loader: YAML with positions, schema findings on the right key or value, semantic checks."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from gateway.model import Message, Record
from gateway.routefile import loader
from gateway.routefile.loader import LoadResult, load_routes, load_routes_bytes, load_routes_text
from gateway.routefile.readfile import RouteFileError, read_route_file
from gateway.routefile.schema import QOS2_REASON
from gateway.routefile.yamlreader import read_yaml
from gateway.routing.table import DeadLetter
from tests.support.nonblocking import finishes_without_blocking

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "routes"
VALID = sorted((FIXTURES / "valid").glob("*.yaml"))
INVALID = sorted((FIXTURES / "invalid").glob("*.yaml"))
_EXPECT = re.compile(r"^# expect: rule=(?P<rule>[a-z0-9-]+) line=(?P<line>\d+) col=(?P<col>\d+)$")

HEAD = "version: 1\nroutes:\n"
WELDERS = HEAD + "  - name: welders\n    topic: \"factory/+/welder/#\"\n    stream: welder-telemetry\n"


def expectation(path: Path) -> tuple[str, int, int]:
    match = _EXPECT.match(path.read_text(encoding="utf-8").splitlines()[0])
    assert match, f"{path.name}: first line must be '# expect: rule=... line=... col=...'"
    return match["rule"], int(match["line"]), int(match["col"])


def load(text: str) -> LoadResult:
    return load_routes_text(text, "routes.yaml")


def errors(result: LoadResult) -> list[tuple[str, int, int]]:
    return [(f.rule, f.line, f.column) for f in result.findings if f.severity == "error"]


def test_the_invalid_corpus_has_at_least_thirty_files() -> None:
    assert len(INVALID) >= 30


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_fixture_builds_a_table(path: Path) -> None:
    result = load_routes(path)
    assert result.ok, [f.format_text() for f in result.findings]
    assert result.table is not None and result.table.routes


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_fixture_reports_exactly_its_one_defect(path: Path) -> None:
    result = load_routes(path)
    assert result.table is None
    assert errors(result) == [expectation(path)], [f.format_text() for f in result.findings]


def test_example_route_file_is_valid() -> None:
    result = load_routes(Path(__file__).resolve().parents[2] / "routes.example.yaml")
    assert result.ok and result.table is not None
    welders = result.table.get("welders")
    assert welders is not None
    assert welders.filters == ("factory/+/welder/#",) and welders.stream == "welder-telemetry"
    assert welders.qos == 1 and welders.append_newline is True


def test_table_keeps_digest_of_the_text_and_its_source() -> None:
    text = WELDERS + "    partition_key: name\n"
    table = load(text).table
    assert table is not None
    assert table.digest == hashlib.sha256(text.encode()).hexdigest()
    assert table.source == "routes.yaml"


def test_defaults_apply_where_a_route_omits_a_key() -> None:
    text = ("version: 1\ndefaults:\n  stream: shared\n  partition_key: \"topic(`2`)\"\n  qos: 0\n"
            "  dead_letter: {topic: gateway/dead}\nroutes:\n  - name: a\n    topic: a/#\n"
            "  - name: b\n    topic: b/#\n    qos: 1\n    stream: own\n")
    table = load(text).table
    assert table is not None
    a, b = table.routes
    assert (a.stream, a.qos, a.partition_key.source) == ("shared", 0, "topic(`2`)")
    assert (b.stream, b.qos) == ("own", 1)
    assert a.dead_letter == DeadLetter("mqtt", "gateway/dead")


def test_route_line_is_recorded_for_messages() -> None:
    table = load(WELDERS + "    partition_key: name\n").table
    assert table is not None and table.routes[0].line == 3


def test_topic_list_is_kept_in_order_without_duplicates() -> None:
    text = HEAD + "  - name: a\n    topic: [x/1, x/2, x/1]\n    stream: s\n    partition_key: k\n"
    table = load(text).table
    assert table is not None and table.routes[0].filters == ("x/1", "x/2")


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y", "n", "Yes", "OFF", "2024-01-01", "1:30"])
def test_yaml_1_1_words_and_dates_stay_strings(word: str) -> None:
    text = HEAD + f"  - name: a\n    topic: x/{word}\n    stream: s\n    partition_key: \"`{word}`\"\n"
    result = load(text.replace("name: a", f"name: {word}" if re.fullmatch(r"[\w.-]+", word) else "name: a"))
    assert result.ok, [f.format_text() for f in result.findings]
    table = result.table
    assert table is not None and table.routes[0].filters == (f"x/{word}",)


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "y", "N"])
def test_unquoted_yaml_1_1_boolean_where_a_boolean_is_expected_is_an_error(word: str) -> None:
    result = load(WELDERS + f"    partition_key: name\n    aggregate: {word}\n")
    assert errors(result) == [("yaml-ambiguous-scalar", 7, 16)]
    assert "true or false" in result.findings[0].message


def test_duplicate_key_names_both_lines() -> None:
    result = load(WELDERS + "    partition_key: name\n    stream: other\n")
    (finding,) = result.findings
    assert (finding.rule, finding.line, finding.column) == ("duplicate-key", 7, 5)
    assert "line 5" in finding.message


def test_unknown_key_points_at_the_key_and_suggests_the_right_one() -> None:
    result = load(WELDERS + "    partiton_key: name\n")
    rules = {(f.rule, f.line, f.column, f.path) for f in result.findings}
    assert ("schema", 6, 5, "routes[0].partiton_key") in rules
    assert any("did you mean 'partition_key'" in f.message for f in result.findings)


def test_missing_required_key_points_at_the_parent_mapping() -> None:
    result = load("version: 1\nroutes:\n  - topic: a\n    stream: s\n    partition_key: k\n")
    assert errors(result) == [("missing-key", 3, 5)]


def test_wrong_type_points_at_the_value_and_says_only_the_type() -> None:
    result = load(WELDERS + "    partition_key: name\n    qos: [1]\n")
    assert errors(result) == [("schema", 7, 10)]
    assert "expected an integer, got a list" in result.findings[0].message


def test_qos2_is_refused_with_reason() -> None:
    result = load(WELDERS + "    partition_key: name\n    qos: 2\n")
    (finding,) = result.findings
    assert finding.rule == "qos2-refused"
    assert finding.message == QOS2_REASON
    assert "after a crash the broker resends only PUBREL" in finding.message


def test_share_prefix_message_says_sharing_is_a_process_setting() -> None:
    result = load(HEAD + "  - name: a\n    topic: $share/g/a/#\n    stream: s\n    partition_key: k\n")
    (finding,) = result.findings
    assert finding.rule == "topic-filter" and "process setting" in finding.message


def test_jmespath_error_column_points_into_a_plain_scalar() -> None:
    result = load(WELDERS + "    partition_key: a.b || ]\n")
    assert errors(result) == [("jmespath-syntax", 6, 20 + len("a.b || "))]


def test_jmespath_error_column_points_into_a_quoted_scalar() -> None:
    result = load(WELDERS + "    partition_key: 'a.b || ]'\n")
    assert errors(result) == [("jmespath-syntax", 6, 21 + len("a.b || "))]


def test_jmespath_error_in_a_block_scalar_points_at_its_start() -> None:
    result = load(WELDERS + "    partition_key: >-\n      a.b || ]\n")
    (finding,) = result.findings
    assert (finding.rule, finding.line) == ("jmespath-syntax", 6)


def test_raw_route_may_not_read_the_payload_even_through_defaults() -> None:
    text = ("version: 1\ndefaults:\n  partition_key: device.id\nroutes:\n"
            "  - name: cams\n    topic: cams/+\n    stream: s\n    format: raw\n")
    result = load(text)
    assert errors(result) == [("raw-expression", 3, 18)]
    assert "route 'cams'" in result.findings[0].message


def test_raw_route_may_use_topic_uuid_timestamp_and_literals() -> None:
    text = HEAD + ("  - name: cams\n    topic: cams/+\n    stream: s\n    format: raw\n"
                   "    partition_key: \"join('-', [topic(`2`), uuid(), to_string(timestamp()), 'x'])\"\n")
    assert load(text).ok


def test_overlapping_routes_are_allowed_and_reported_as_info() -> None:
    text = HEAD + ("  - name: a\n    topic: f/#\n    stream: s\n    partition_key: k\n"
                   "  - name: b\n    topic: f/+/w\n    stream: s\n    partition_key: k\n"
                   "  - name: c\n    topic: g/+\n    stream: s\n    partition_key: k\n")
    result = load(text)
    assert result.ok and result.table is not None
    assert [(f.rule, f.severity, f.line) for f in result.findings] == [("overlap", "info", 8)]


def test_filters_that_cannot_share_a_topic_do_not_overlap() -> None:
    text = HEAD + ("  - name: a\n    topic: [+/x, a/b/c]\n    stream: s\n    partition_key: k\n"
                   "  - name: b\n    topic: [$SYS/x, a/b]\n    stream: s\n    partition_key: k\n")
    assert load(text).findings == ()


def test_overlap_with_the_parent_level_of_a_hash() -> None:
    text = HEAD + ("  - name: a\n    topic: f/#\n    stream: s\n    partition_key: k\n"
                   "  - name: b\n    topic: f\n    stream: s\n    partition_key: k\n")
    assert [f.rule for f in load(text).findings] == ["overlap"]


def test_every_error_of_a_file_is_reported_in_one_run() -> None:
    text = HEAD + ("  - name: a\n    topic: a/#/b\n    stream: 'bad stream'\n    partition_key: nope(\n"
                   "    qos: 2\n    extra: 1\n")
    rules = [f.rule for f in load(text).findings]
    assert sorted(rules) == ["jmespath-syntax", "qos2-refused", "schema", "stream-name", "topic-filter"]


def test_the_loaded_table_routes_the_seed_payload() -> None:
    table = load(WELDERS + "    partition_key: name\n").table
    assert table is not None
    payload = b'{"name": "device123", "model": "welder", "status": "running"}'
    (record,) = table.route(Message("factory/line1/welder/w7", payload, 1, 0))
    assert isinstance(record, Record) and record.partition_key == "device123"


def test_unreadable_file_is_a_finding(tmp_path: Path) -> None:
    result = load_routes(tmp_path / "missing.yaml")
    assert [(f.rule, f.line, f.column) for f in result.findings] == [("unreadable", 1, 1)]
    assert result.table is None


def test_file_that_is_not_utf8_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"version: 1\nroutes: \xff\xfe\n")
    assert [f.rule for f in load_routes(path).findings] == ["unreadable"]


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (WELDERS + "    partition_key: name\n").encode())
    assert load_routes(path).ok


# --- each finding once, and a ConfigMap named for what it is ----------------------------------

EXTRA_TEXTS = ["foo: 1\n", "{}\n", "routes: 5\n", "version: 2\nroutes: []\n", "version: 1\nroutes:\n  - {}\n",
               (ROOT / "deploy" / "kubernetes" / "configmap-routes.yaml").read_text(encoding="utf-8")]


@pytest.mark.parametrize("text", [p.read_text(encoding="utf-8") for p in (*VALID, *INVALID)] + EXTRA_TEXTS)
def test_no_finding_is_reported_twice(text: str) -> None:
    findings = load(text).findings
    assert len(set(findings)) == len(findings), [f.format_text() for f in findings]


def test_each_missing_top_level_key_is_named_once() -> None:
    assert [(f.rule, f.message) for f in load("foo: 1\n").findings] == [
        ("schema", "unknown key 'foo' (allowed: version, defaults, routes)"),
        ("missing-key", "missing required key 'version'"),
        ("missing-key", "missing required key 'routes'"),
    ]


def test_a_configmap_given_as_a_route_file_says_what_it_is() -> None:
    manifest = ROOT / "deploy" / "kubernetes" / "configmap-routes.yaml"
    (finding,) = load_routes(manifest).findings
    assert (finding.rule, finding.line, finding.column) == ("configmap", 5, 7)  # at `kind: ConfigMap`
    assert "this is a Kubernetes ConfigMap, not a route file" in finding.message


# --- what a route file may be: a regular file under the size limit (docs/route-file.md#limits) ---


def _refused(path: Path) -> str:
    result = load_routes(path)
    assert result.table is None
    (finding,) = result.findings
    assert (finding.file, finding.line, finding.column, finding.rule) == (str(path), 1, 1, "unreadable")
    return finding.message


def test_a_symlink_to_dev_zero_is_refused_without_reading_it(tmp_path: Path) -> None:
    link = tmp_path / "routes.yaml"
    link.symlink_to("/dev/zero")
    assert _refused(link) == "a character device, not a regular file"


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "routes.yaml"
    os.mkfifo(fifo)

    def unblock() -> None:  # a writer releases a blocked open()
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    assert finishes_without_blocking(lambda: _refused(fifo), unblock, "reading the route file") == "a FIFO (named pipe), not a regular file"


def test_a_directory_is_refused(tmp_path: Path) -> None:
    assert _refused(tmp_path) == "a directory, not a regular file"


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    with open(path, "wb") as handle:  # sparse: 100 MB on paper, nothing on disk
        handle.truncate(100 * 1024 * 1024)
    assert _refused(path) == "the file is 100 MiB (104857600 bytes): a route file is at most 16 MiB"


def test_the_size_limit_is_inclusive(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"x" * 10)
    assert read_route_file(path, limit=10) == b"x" * 10
    with pytest.raises(RouteFileError, match="at most 9 bytes"):
        read_route_file(path, limit=9)


def test_table_digest_is_of_the_bytes_read_byte_order_mark_included(tmp_path: Path) -> None:
    raw = b"\xef\xbb\xbf" + (WELDERS + "    partition_key: name\n").encode()
    path = tmp_path / "routes.yaml"
    path.write_bytes(raw)
    table = load_routes(path).table
    assert table is not None and table.digest == hashlib.sha256(raw).hexdigest()
    assert load_routes_bytes(raw, "routes.yaml").table.digest == table.digest  # type: ignore[union-attr]


def test_a_long_document_without_aliases_is_not_too_large() -> None:
    doc = read_yaml("[" + ", ".join(["x"] * 150_000) + "]\n", "routes.yaml")  # 150,001 nodes
    assert doc.findings == () and len(doc.data) == 150_000


def test_aliases_that_expand_too_far_are_refused() -> None:
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcde", "bcdef"))
    (finding,) = load(text).findings
    assert (finding.rule, finding.message) == ("yaml-syntax", "the document is too large (aliases expand too far)")


@pytest.mark.parametrize(
    "text",
    [
        "&a [*a]",
        "a: &a {b: *a}",
        "[" * 5000,
        "- " * 3000 + "x",
        ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
         "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
         "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"),
        "? [a, b]\n: c\n",
        "!custom x",
        "\x00",
        "42",
        "---\n...\n",
    ],
    ids=["self-alias", "map-alias-cycle", "deep-flow", "deep-block", "billion-laughs", "complex-key",
         "custom-tag", "nul", "scalar-document", "empty-document"],
)
def test_hostile_yaml_yields_findings_not_exceptions(text: str) -> None:
    result = load(text)
    assert result.table is None
    assert result.findings and all(f.line >= 1 and f.column >= 1 for f in result.findings)


_LEVEL = st.sampled_from(["a", "b", "$s", "+"])
_FILTER = st.tuples(st.lists(_LEVEL, min_size=1, max_size=3), st.booleans()).map(
    lambda parts: "/".join(parts[0] + (["#"] if parts[1] else [])))
_TOPICS = ["/".join(c) for n in range(1, 5) for c in itertools.product(["a", "b", "$s", "c"], repeat=n)]


@settings(max_examples=200, deadline=None)
@given(_FILTER, _FILTER)
def test_overlap_is_reported_exactly_when_some_topic_matches_both_filters(first: str, second: str) -> None:
    text = HEAD + (f"  - name: one\n    topic: '{first}'\n    stream: s\n    partition_key: k\n"
                   f"  - name: two\n    topic: '{second}'\n    stream: s\n    partition_key: k\n")
    reported = [f.rule for f in load(text).findings if f.rule == "overlap"] == ["overlap"]
    both = any(topic_matches_sub(first, t) and topic_matches_sub(second, t) for t in _TOPICS)
    assert reported == both


def test_thousands_of_routes_load_and_overlaps_are_found_without_pairwise_scans() -> None:
    lines = ["version: 1", "routes:"]
    for i in range(3000):
        lines += [f"  - name: r{i}", f"    topic: site/{i % 50}/dev{i}/+", "    stream: s", "    partition_key: name"]
    lines += ["  - name: all", "    topic: 'site/#'", "    stream: s", "    partition_key: topic()"]
    result = load("\n".join(lines) + "\n")
    assert result.table is not None and len(result.table.routes) == 3001
    assert [f.rule for f in result.findings] == ["overlap"] * 3000


# --- the schema step in a child process (what the running gateway does) ----------------------


@pytest.fixture
def schema_in_child() -> Iterator[None]:
    loader.check_schema_in_child(True)
    try:
        yield
    finally:
        loader.check_schema_in_child(False)


def test_schema_checked_in_a_child_finds_exactly_what_the_cli_finds(schema_in_child: None) -> None:
    cases = [*INVALID, *VALID]
    in_child = [load_routes(path).findings for path in cases]
    loader.check_schema_in_child(False)
    assert in_child == [load_routes(path).findings for path in cases]


def test_a_child_that_cannot_run_falls_back_to_this_process(
        schema_in_child: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(2, "No such file or directory")

    monkeypatch.setattr(loader.subprocess, "run", broken)
    result = load_routes(INVALID[0])
    assert errors(result)[0] == expectation(INVALID[0])
    assert "schema check in a child process failed" in caplog.text


def test_the_running_gateway_never_imports_jsonschema(tmp_path: Path) -> None:
    code = ("import sys; import gateway.app; from gateway.routefile import loader; "
            "loader.check_schema_in_child(); "
            f"assert loader.load_routes({str(VALID[0])!r}).ok; "
            "print('jsonschema' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_partly_overlapping_subscribed_filters_are_a_warning_naming_both_routes() -> None:
    text = HEAD + ("  - name: all\n    topic: factory/#\n    stream: s\n    partition_key: k\n"
                   "  - name: welders\n    topic: +/+/welder/+/telemetry\n    stream: s\n    partition_key: k\n"
                   "  - name: covered\n    topic: factory/a/+\n    stream: s\n    partition_key: k\n")
    result = load(text)
    assert result.ok and result.table is not None
    warnings = [f for f in result.findings if f.severity == "warning"]
    assert [(f.rule, f.line) for f in warnings] == [("overlapping-filters", 8)]
    assert "'welders'" in warnings[0].message and "'all'" in warnings[0].message
    assert "MQTT 3.1.1" in warnings[0].message


def test_a_filter_covered_by_another_is_not_subscribed_so_no_warning() -> None:
    text = HEAD + ("  - name: a\n    topic: f/#\n    stream: s\n    partition_key: k\n"
                   "  - name: b\n    topic: f/+/w\n    stream: s\n    partition_key: k\n")
    assert [f.rule for f in load(text).findings] == ["overlap"]
