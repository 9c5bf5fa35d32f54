"""Reporters: the text, json and github renderings of findings, and their summaries."""

from __future__ import annotations

import io
import json

from gateway.routefile.findings import REPORTERS, FileReport, Finding


def _finding(message: str = "unknown key 'strem'", severity: str = "error", rule: str = "schema") -> Finding:
    return Finding("routes.yaml", 7, 12, "routes[0].strem", rule, severity, message)  # type: ignore[arg-type]


def _render(name: str, reports: list[FileReport]) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    REPORTERS[name](reports, out, err)
    return out.getvalue(), err.getvalue()


def test_format_text_is_path_line_col_message_rule() -> None:
    assert _finding().format_text() == "routes.yaml:7:12: unknown key 'strem' [schema]"


def test_reporters_are_chosen_by_name() -> None:
    assert set(REPORTERS) == {"text", "json", "github"}


def test_text_reporter_prints_findings_on_out_and_summary_on_err() -> None:
    reports = [FileReport("routes.yaml", (_finding(), _finding("x")))]
    out, err = _render("text", reports)
    assert out.splitlines() == ["routes.yaml:7:12: unknown key 'strem' [schema]", "routes.yaml:7:12: x [schema]"]
    assert err.strip() == "2 errors in 1 file"


def test_text_summary_of_a_valid_file_counts_routes() -> None:
    out, err = _render("text", [FileReport("routes.yaml", (), routes=4)])
    assert out == ""
    assert err.strip() == "routes.yaml: valid, 4 routes"


def test_text_summary_counts_files_with_errors_only() -> None:
    reports = [FileReport("a.yaml", (_finding(),)), FileReport("b.yaml", (), routes=1),
               FileReport("c.yaml", (_finding(), _finding()))]
    _, err = _render("text", reports)
    assert err.splitlines() == ["b.yaml: valid, 1 route", "3 errors in 2 files"]


def test_info_findings_do_not_make_a_file_invalid() -> None:
    report = FileReport("routes.yaml", (_finding(severity="info", rule="overlap"),), routes=2)
    assert report.valid
    _, err = _render("text", [report])
    assert err.strip() == "routes.yaml: valid, 2 routes, 1 note"


def test_json_reporter_prints_only_one_object() -> None:
    out, err = _render("json", [FileReport("routes.yaml", (_finding(),))])
    document = json.loads(out)
    assert document == {
        "valid": False,
        "errors": [{"file": "routes.yaml", "line": 7, "column": 12, "path": "routes[0].strem",
                    "rule": "schema", "severity": "error", "message": "unknown key 'strem'"}],
    }
    assert err == ""


def test_json_reporter_is_valid_with_only_info_findings() -> None:
    out, _ = _render("json", [FileReport("r.yaml", (_finding(severity="info", rule="overlap"),), routes=2)])
    assert json.loads(out)["valid"] is True


def test_github_reporter_writes_error_annotations() -> None:
    out, err = _render("github", [FileReport("routes.yaml", (_finding(),))])
    assert out == "::error file=routes.yaml,line=7,col=12,title=schema::unknown key 'strem'\n"
    assert "1 error in 1 file" in err


def test_github_reporter_writes_info_as_notice() -> None:
    out, _ = _render("github", [FileReport("routes.yaml", (_finding("overlaps", "info", "overlap"),))])
    assert out.startswith("::notice file=routes.yaml,line=7,col=12,title=overlap::overlaps")


def test_github_reporter_escapes_data_and_properties() -> None:
    finding = Finding("dir,x/a:b.yaml", 1, 2, "", "schema", "error", "100% bad\r\nnext")
    out, _ = _render("github", [FileReport(finding.file, (finding,))])
    assert out == "::error file=dir%2Cx/a%3Ab.yaml,line=1,col=2,title=schema::100%25 bad%0D%0Anext\n"
