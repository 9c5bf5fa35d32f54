"""The command line, run in-process through main(): exit codes, output formats, dry runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import cli
from gateway.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "routes.example.yaml"
FIXTURES = ROOT / "tests" / "fixtures" / "routes"
INVALID = sorted((FIXTURES / "invalid").glob("*.yaml"))
SEED_PAYLOAD = ('{"name": "device123", "model": "welder", "status": "running", "sensor_1": 24.5, '
                '"sensor_2": 98.3, "sensor_3": 16.1, "sensor_4": 0.9, "sensor_5": 5.5, "sensor_6": 100.32}')
_EXPECT = re.compile(r"^# expect: rule=(?P<rule>[a-z0-9-]+) line=(?P<line>\d+) col=(?P<col>\d+)$")


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


ROUTE_TOPIC3 = """version: 1
routes:
  - name: welders
    topic: "factory/+/welder/#"
    stream: welder-telemetry
    partition_key: "topic(`3`)"
"""

ROUTE_NAME = ROUTE_TOPIC3.replace('"topic(`3`)"', "name")


# --- validate ---------------------------------------------------------------------------------


def test_validate_example_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", EXAMPLE)
    assert code == 0, out
    assert out == ""
    assert err.strip() == f"{EXAMPLE}: valid, 4 routes"


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_validate_invalid_fixture_exits_1_with_rule_line_and_column(
    capsys: pytest.CaptureFixture[str], path: Path
) -> None:
    match = _EXPECT.match(path.read_text(encoding="utf-8").splitlines()[0])
    assert match
    code, out, _ = run(capsys, "validate", path)
    assert code == 1
    expected = f"{path}:{match['line']}:{match['col']}: "
    lines = [line for line in out.splitlines() if line.startswith(expected) and line.endswith(f"[{match['rule']}]")]
    assert lines, out


def test_validate_several_files_reports_each(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", EXAMPLE, INVALID[0], INVALID[1])
    assert code == 1
    assert str(INVALID[0]) in out and str(INVALID[1]) in out
    assert "errors in 2 files" in err


def test_validate_json_prints_one_object_only(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "validate", "--format", "json", FIXTURES / "invalid" / "qos2-route.yaml")
    assert code == 1
    document = json.loads(out)
    assert document["valid"] is False
    (error,) = document["errors"]
    assert set(error) == {"file", "line", "column", "path", "rule", "severity", "message"}
    assert (error["rule"], error["line"], error["column"], error["path"]) == ("qos2-refused", 8, 10, "routes[0].qos")
    assert err == ""


def test_validate_json_of_a_valid_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "--format", "json", EXAMPLE)
    assert code == 0 and json.loads(out) == {"valid": True, "errors": []}


def test_validate_github_annotations(capsys: pytest.CaptureFixture[str]) -> None:
    path = FIXTURES / "invalid" / "duplicate-route.yaml"
    code, out, _ = run(capsys, "validate", "--format", "github", path)
    assert code == 1
    assert out.startswith(f"::error file={path},line=8,col=11,title=duplicate-route::")


def test_validate_unreadable_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "validate", tmp_path / "nope.yaml")
    assert code == 2
    assert "[unreadable]" in out


def test_validate_directory_is_unreadable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, _ = run(capsys, "validate", tmp_path)
    assert code == 2


def _not_route_files(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / f"{name}.yaml" for name in ("dev-zero", "fifo", "directory", "100-mb")}
    paths["dev-zero"].symlink_to("/dev/zero")
    os.mkfifo(paths["fifo"])
    paths["directory"].mkdir()
    with open(paths["100-mb"], "wb") as handle:  # sparse: costs no disk
        handle.truncate(100 * 1024 * 1024)
    return paths


def test_validate_refuses_what_is_not_a_route_file_with_one_line_each_and_exit_2(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    paths = _not_route_files(tmp_path)
    code, out, _ = run(capsys, "validate", *paths.values())
    assert code == 2
    lines = out.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [str(p) for p in paths.values()]
    assert all(line.endswith("[unreadable]") for line in lines)
    expected = ["character device", "FIFO", "directory", "100 MiB (104857600 bytes): a route file is at most 16 MiB"]
    assert [text in line for text, line in zip(expected, lines, strict=True)] == [True] * 4


def test_validate_refuses_an_expression_nested_forty_levels_deep_at_its_line_and_column(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = "data"
    for _ in range(40):  # each level doubles every message's output: 2.6 GB per message at 40
        source = f"to_string([{source}])"
    path = write(tmp_path, "routes.yaml", ROUTE_NAME + f'    transform: "{source}"\n')
    code, out, _ = run(capsys, "validate", path)
    assert code == 1
    ninth_call = [m.start() for m in re.finditer(r"to_string\(", source)][8]
    column = len('    transform: "') + 1 + ninth_call
    (line,) = out.splitlines()
    assert line.startswith(f"{path}:7:{column}: transform: function calls, lists and objects nest 80 levels deep")
    assert line.endswith("[jmespath-nesting]")


def test_validate_checks_the_route_files_inside_a_configmap(capsys: pytest.CaptureFixture[str]) -> None:
    manifest = ROOT / "deploy" / "kubernetes" / "configmap-routes.yaml"
    code, out, err = run(capsys, "validate", manifest)
    assert code == 0, out
    assert out == "" and err.startswith(f"{manifest} (data: routes.yaml): valid, ")


CONFIGMAP = """apiVersion: v1
kind: ConfigMap
metadata:
  name: routes
data:
  README: not a route file
  routes.yaml: |
    version: 1
    routes:
      - name: welders

        topic: "factory/#/welder"
        stream: welder-telemetry
        partition_key: name
  quoted.yml: "version: 1\\nroutes: []\\n"
"""


def test_validate_places_the_findings_of_a_configmap_entry_on_the_manifests_lines(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "configmap.yaml", CONFIGMAP)
    code, out, err = run(capsys, "validate", path)
    assert code == 1
    assert out.splitlines() == [
        f"{path}:12:16: '#' is allowed only as the last level [topic-filter]",  # inside the '|' block
        f"{path}:15:15: routes: must not be an empty list [schema]",  # a quoted entry: at its start
    ]
    assert "(data: README)" not in err


def test_validate_says_when_a_configmap_holds_no_route_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "configmap.yaml", "apiVersion: v1\nkind: ConfigMap\ndata:\n  README: hello\n")
    code, out, _ = run(capsys, "validate", path)
    assert code == 1 and out.endswith("no route file to check [configmap]\n")


def test_validate_names_each_missing_key_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "validate", write(tmp_path, "routes.yaml", "foo: 1\n"))
    assert code == 1
    assert [line.rsplit(" [", 1)[1] for line in out.splitlines()] == ["schema]", "missing-key]", "missing-key]"]


@pytest.mark.parametrize("argv", [[], ["validate"], ["validate", "--format", "xml", "x.yaml"], ["bogus"],
                                  ["explain", "r.yaml", "--topic", "t"]])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "usage:" in err


def test_help_exits_0_and_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "Exit codes" in out


# --- explain ----------------------------------------------------------------------------------


def _records(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines()]


def test_explain_partition_key_from_topic_level(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    routes = write(tmp_path, "routes.yaml", ROUTE_TOPIC3)
    code, out, _ = run(capsys, "explain", routes, "--topic", "factory/line1/welder/w7", "--payload", SEED_PAYLOAD)
    assert code == 0
    assert _records(out) == [{"route": "welders", "stream": "welder-telemetry", "partition_key": "welder",
                              "data": SEED_PAYLOAD}]


def test_explain_partition_key_from_payload_field(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    routes = write(tmp_path, "routes.yaml", ROUTE_NAME)
    code, out, _ = run(capsys, "explain", routes, "--topic", "factory/line1/welder/w7", "--payload", SEED_PAYLOAD)
    assert code == 0
    (record,) = _records(out)
    assert record["partition_key"] == "device123"


def test_explain_example_file_welders_route(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", EXAMPLE, "--topic", "factory/line1/welder/w7", "--payload", SEED_PAYLOAD)
    assert code == 0
    (record,) = _records(out)
    assert record == {"route": "welders", "stream": "welder-telemetry", "partition_key": "device123",
                      "data": SEED_PAYLOAD + "\n"}


def test_explain_rejected_payload_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    routes = write(tmp_path, "routes.yaml", ROUTE_NAME)
    code, out, _ = run(capsys, "explain", routes, "--topic", "factory/l/welder/w", "--payload", "{not json")
    assert code == 1
    (item,) = _records(out)
    assert item["route"] == "welders" and "not JSON" in str(item["rejected"])


def test_explain_skipped_by_filter(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    routes = write(tmp_path, "routes.yaml", ROUTE_NAME + "    filter: \"status == 'running'\"\n")
    code, out, _ = run(capsys, "explain", routes, "--topic", "factory/l/welder/w", "--payload", '{"status": "idle"}')
    assert code == 1
    assert _records(out) == [{"route": "welders", "skipped": "filter"}]


def test_explain_unmatched_topic_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    routes = write(tmp_path, "routes.yaml", ROUTE_NAME)
    code, out, err = run(capsys, "explain", routes, "--topic", "elsewhere", "--payload", "{}")
    assert code == 1 and out == ""
    assert "no route matches" in err


def test_explain_binary_record_is_base64(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    routes = write(tmp_path, "routes.yaml", ROUTE_TOPIC3 + "    format: raw\n")
    payload = write(tmp_path, "frame.bin", "")
    payload.write_bytes(b"\xff\x00\xfe")
    code, out, _ = run(capsys, "explain", routes, "--topic", "factory/l/welder/w", "--payload-file", payload)
    assert code == 0
    (record,) = _records(out)
    assert record["data_base64"] == "/wD+" and "data" not in record


def test_explain_shows_explicit_hash_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    routes = write(tmp_path, "routes.yaml", ROUTE_NAME + "    explicit_hash_key: \"`42`\"\n")
    code, out, _ = run(capsys, "explain", routes, "--topic", "factory/l/welder/w", "--payload", SEED_PAYLOAD)
    assert code == 0 and _records(out)[0]["explicit_hash_key"] == "42"


def test_explain_shows_the_mqtt5_metadata_it_used_and_the_transform_sees_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    transform = ("{name: name, qos: qos(), retained: retained(), site: user_property('site'), "
                 "props: user_properties(), type: content_type()}")
    routes = write(tmp_path, "routes.yaml", ROUTE_NAME + f'    transform: "{transform}"\n')
    code, out, err = run(capsys, "explain", routes, "--topic", "factory/l/welder/w", "--payload", SEED_PAYLOAD,
                         "--qos", "0", "--retain", "--user-property", "site=plant-7", "--user-property", "line=a=b",
                         "--content-type", "application/json")
    assert code == 0
    (record,) = _records(out)
    assert json.loads(record["data"]) == {"name": "device123", "qos": 0, "retained": True, "site": "plant-7",
                                          "props": {"site": "plant-7", "line": "a=b"}, "type": "application/json"}
    (line,) = [x for x in err.splitlines() if x.startswith("metadata: ")]
    shown = json.loads(line.removeprefix("metadata: "))
    assert shown["qos()"] == 0 and shown["retained()"] is True and shown["content_type()"] == "application/json"
    assert shown["user_properties()"] == {"site": "plant-7", "line": "a=b"}
    assert shown["topic()"] == "factory/l/welder/w" and isinstance(shown["timestamp()"], int)


def test_explain_user_property_without_equals_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "explain", EXAMPLE, "--topic", "a", "--payload", "{}", "--user-property", "site")
    assert code == 2 and out == "" and "expected KEY=VALUE" in err and len(err.strip().splitlines()) == 1


def test_explain_invalid_route_file_exits_2_with_findings_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    path = FIXTURES / "invalid" / "qos2-route.yaml"
    code, out, err = run(capsys, "explain", path, "--topic", "factory/l/welder/w", "--payload", "{}")
    assert code == 2 and out == ""
    assert f"{path}:8:10:" in err and "[qos2-refused]" in err


def test_explain_wildcard_topic_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "explain", EXAMPLE, "--topic", "factory/+/welder/w", "--payload", "{}")
    assert code == 2 and "wildcards" in err


def test_explain_missing_payload_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "explain", EXAMPLE, "--topic", "a", "--payload-file", tmp_path / "none")
    assert code == 2 and len(err.strip().splitlines()) == 1


# --- test -------------------------------------------------------------------------------------


def test_test_command_passes_the_example_cases(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "test", EXAMPLE, FIXTURES / "cases.example.yaml")
    assert code == 0, out
    assert all(line.startswith("PASS ") for line in out.splitlines())
    assert "0 failed" in err


def test_test_command_reports_a_failing_case_with_a_diff(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = write(tmp_path, "cases.yaml", """cases:
  - name: wrong key
    topic: factory/l/welder/w
    payload: {"name": "device123"}
    expect:
      - {route: welders, partition_key: device999}
  - name: right key
    topic: factory/l/welder/w
    payload: {"name": "device123"}
    expect:
      - {route: welders, partition_key: device123, data: {"name": "device123"}}
""")
    routes = write(tmp_path, "routes.yaml", ROUTE_NAME)
    code, out, err = run(capsys, "test", routes, cases)
    assert code == 1
    assert out.splitlines() == [
        "FAIL wrong key",
        '  - welders.partition_key: "device999"',
        '  + welders.partition_key: "device123"',
        "PASS right key",
    ]
    assert "1 passed, 1 failed" in err


def test_test_command_fails_on_an_unexpected_record(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = write(tmp_path, "cases.yaml", "cases:\n  - {name: none, topic: factory/l/welder/w, payload: '{}', expect: []}\n")
    routes = write(tmp_path, "routes.yaml", ROUTE_TOPIC3)
    code, out, _ = run(capsys, "test", routes, cases)
    assert code == 1 and out.startswith("FAIL none")


@pytest.mark.parametrize("text", ["cases: 5\n", "cases:\n  - {topic: a, expect: []}\n", "[unclosed\n",
                                  "cases:\n  - {topic: a, payload: x, expect: [{stream: s}]}\n"])
def test_test_command_with_a_bad_cases_file_exits_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str
) -> None:
    code, _, err = run(capsys, "test", EXAMPLE, write(tmp_path, "cases.yaml", text))
    assert code == 2 and err.strip()


# --- schema, run, packaging -------------------------------------------------------------------


def test_schema_command_prints_the_shipped_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "schema")
    assert code == 0
    assert json.loads(out) == json.loads((ROOT / "schema" / "routes.schema.json").read_text(encoding="utf-8"))


def test_python_dash_m_gateway_schema_works() -> None:
    done = subprocess.run([sys.executable, "-m", "gateway", "schema"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["$id"]


@pytest.fixture
def quiet_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` in-process without touching the test run's logging or the loader's mode."""
    for name in ("configure_logging", "log_uncaught_exceptions", "check_schema_in_child"):
        monkeypatch.setattr(cli, name, lambda *args, **kwargs: None)


def test_run_loads_routes_then_hands_them_to_the_app_lazily(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, quiet_run: None) -> None:
    seen = {}

    class FakeGateway:
        def __init__(self, settings: object, table: object) -> None:
            seen["settings"], seen["table"] = settings, table

        def run_until_stopped(self) -> int:
            return 0

    monkeypatch.setitem(sys.modules, "gateway.app", types.SimpleNamespace(Gateway=FakeGateway))
    monkeypatch.setenv("MQTT_HOST", "broker.example")
    monkeypatch.delenv("GATEWAY_ROUTES", raising=False)
    code, _, _ = run(capsys, "run", "--routes", str(EXAMPLE))
    assert code == 0
    assert seen["settings"].routes_file == str(EXAMPLE)  # type: ignore[attr-defined]
    assert [r.name for r in seen["table"].routes]  # type: ignore[attr-defined]


def test_run_with_an_invalid_route_file_never_starts_the_app(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, quiet_run: None,
        tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("version: 1\nroutes: []\n")
    monkeypatch.setitem(sys.modules, "gateway.app", None)   # importing it would fail the test
    monkeypatch.setenv("MQTT_HOST", "broker.example")
    code, _, _ = run(capsys, "run", "--routes", str(routes))
    assert code == 2


@pytest.mark.parametrize(("env", "named"), [({"MQTT_PORT": "abc"}, "MQTT_PORT"), ({"LOG_FORMAT": "yaml"}, "LOG_FORMAT")])
def test_run_with_bad_settings_is_one_log_line_on_the_log_channel_and_exit_2(env: dict[str, str], named: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "GATEWAY_", "LOG_", "AWS_"))}
    environ.update({"MQTT_HOST": "broker.example", "LOG_FORMAT": "json", **env})
    done = subprocess.run([sys.executable, "-m", "gateway", "run", "--routes", "r.yaml"], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stderr == ""
    (line,) = done.stdout.splitlines()
    record = json.loads(line)  # the log format in force (json here; auto when the format is what is wrong)
    assert record["level"] == "ERROR" and named in record["message"] and "not starting" in record["message"]


def test_unexpected_exception_is_one_line_and_exit_2(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, quiet_run: None) -> None:
    def broken(settings: object, table: object) -> Any:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(sys.modules, "gateway.app", types.SimpleNamespace(Gateway=broken))
    monkeypatch.setenv("MQTT_HOST", "broker.example")
    code, _, err = run(capsys, "run", "--routes", str(EXAMPLE))
    assert code == 2
    assert err.count("\n") == 1 and "internal error: RuntimeError: boom" in err


def test_pre_commit_hook_publishes_validate() -> None:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    (hook,) = hooks
    assert hook["id"] == "mqtt-kinesis-gateway-validate"
    assert hook["language"] == "python"
    assert hook["entry"] == "mqtt-kinesis-gateway validate"
    files = re.compile(hook["files"])
    for name in ("routes.yaml", "routes.example.yaml", "deploy/routes-prod.yml"):
        assert files.search(name), name
    assert not files.search("values.yaml")


def test_pre_commit_hook_entry_runs_the_cli_on_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    hook = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))[0]
    program, *arguments = hook["entry"].split()
    assert program == "mqtt-kinesis-gateway"  # [project.scripts] maps it to gateway.cli:main
    code, _, _ = run(capsys, *arguments, EXAMPLE)
    assert code == 0
    code, _, _ = run(capsys, *arguments, INVALID[0])
    assert code == 1
