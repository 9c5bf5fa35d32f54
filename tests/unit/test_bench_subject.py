"""`python -m bench.run --subject NAME=COMMAND`: any bridge configured the way the Go bridge is.

If the option parsed wrongly, the .env lacked one of the Go bridge's names or a placeholder stayed
unfilled, the external bridge would connect to the wrong broker or stream (or real AWS) and the
side-by-side figures would compare the gateway with a bridge that never ran. No processes, no timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run import parse
from bench.subject import (
    External,
    SubjectError,
    bridge_env,
    parse_subject,
    parse_subjects,
    subject,
    substitute,
    write_env_file,
)

GO_NAMES = {"PORT", "BROKER", "CLIENTID", "TOPIC", "QOS", "KIN_STREAM_NAME", "KIN_PARTITION_KEY", "KIN_MAXCONN",
            "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "STDOUT", "AWS_ENDPOINT_URL_KINESIS"}


def test_subject_option_repeats_and_keeps_each_command() -> None:
    args = parse(["--subject", "go=./bridge --flag", "--subject", "other=run {env_file}"])
    assert [(x.name, x.command) for x in args.subjects] == [("go", "./bridge --flag"), ("other", "run {env_file}")]
    assert parse([]).subjects == ()


@pytest.mark.parametrize("value, says", [
    ("no-equals", "expected NAME=COMMAND"),
    ("bad name=x", "expected NAME=COMMAND"),
    ("go=", "COMMAND is empty"),
    ("go=run 'unclosed", "does not parse"),
    ("go=run {prot}", "unknown placeholder {prot}"),
])
def test_bad_subject_is_one_line_naming_the_option(value: str, says: str) -> None:
    with pytest.raises(SubjectError) as err:
        parse_subject(value)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_bad_subject_exits_with_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(["--subject", "go=run {nope}"])
    assert exit_.value.code == 2
    assert "unknown placeholder {nope}" in capsys.readouterr().err


def test_a_name_given_twice_is_refused() -> None:
    with pytest.raises(SubjectError, match="given twice"):
        parse_subjects(["go=a", "go=b"])


def test_paths_in_the_command_are_made_absolute_from_where_the_bench_started(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "bridge").write_text("")
    ext = parse_subject("go=bin/bridge --topic a/b --mode fast", cwd=tmp_path)
    assert ext.words == (str(tmp_path / "bin" / "bridge"), "--topic", "a/b", "--mode", "fast")


def test_env_file_holds_the_go_bridges_names_for_this_run(tmp_path: Path) -> None:
    ext = External("go", "./bridge", ("./bridge",))
    env = bridge_env(ext, mqtt_port=41883, endpoint_url="http://127.0.0.1:4567", qos=1, topic="bench/+/welder/#")
    assert set(env) == GO_NAMES
    assert (env["PORT"], env["BROKER"], env["QOS"], env["TOPIC"]) == ("41883", "127.0.0.1", "1", "bench/+/welder/#")
    assert (env["KIN_STREAM_NAME"], env["STDOUT"]) == (ext.stream, "false")
    assert env["AWS_ENDPOINT_URL_KINESIS"] == "http://127.0.0.1:4567"
    lines = write_env_file(tmp_path / ".env", env).read_text().splitlines()
    assert dict(line.split("=", 1) for line in lines) == env      # unquoted: read literally


def test_placeholders_are_filled_from_the_same_values_as_the_env_file(tmp_path: Path) -> None:
    env = bridge_env(External("go", "", ()), mqtt_port=1999, endpoint_url="http://127.0.0.1:9", qos=0, topic="t/#")
    words = substitute(("run", "--env-file={env_file}", "-p", "{port}", "{broker}:{port}", "{stream}", "{qos}",
                        "{topic}", "{endpoint}", "{client_id}", "{region}", "{workdir}", "${HOME}"),
                       env, tmp_path / ".env")
    assert words == ["run", f"--env-file={tmp_path / '.env'}", "-p", "1999", "127.0.0.1:1999", env["KIN_STREAM_NAME"],
                     "0", "t/#", "http://127.0.0.1:9", env["CLIENTID"], "us-east-1", str(tmp_path), "${HOME}"]


def test_subject_is_set_up_per_run_in_its_own_work_dir(tmp_path: Path) -> None:
    s = subject(parse_subject("go=bridge --env {env_file} --port {port}"), qos=1, topic="bench/#")
    assert s.name == "ext-go" and s.stream == "bench-subject-go" and s.prepare is not None
    argv, env, cwd = s.prepare(1883, "http://127.0.0.1:9", tmp_path)
    assert cwd == tmp_path / "go" and (cwd / ".env").is_file()
    assert argv == ["bridge", "--env", str(cwd / ".env"), "--port", "1883"]
    assert (env["PORT"], env["QOS"], env["TOPIC"]) == ("1883", "1", "bench/#")
