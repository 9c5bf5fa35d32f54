"""Settings from the environment and a .env file, including the Go bridge's own .env."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.settings import settings as settings_module
from gateway.settings.settings import (
    AwsSettings,
    LegacyRoute,
    SettingsError,
    SinkConfig,
    find_env_file,
    load_settings,
)

# The seed's documented .env, written as its users write it: a leading space on every line.
SEED_ENV = """\
 PORT=1883
 WEBSOCKET=8080
 BROKER=public.mqtthq.com
 USER=
 PASS=
 CLIENTID=client-123
 TOPIC=homeassistant/sensor/#
 QOS=0
 BACKLOG_COUNT=2000
 KIN_STREAM_NAME=kinesis-data-stream
 KIN_MAXCONN=10
 KIN_SESSION_NAME=mysession-1234
 KIN_PARTITION_KEY=sensor-data
 AWS_ACCESS_KEY_ID=AKIDEXAMPLE
 AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI-seed-secret
 AWS_ASSUME_ROLE_ARN=arn:aws:iam::111111111111:role/service-role/kinesis-endpoint-access
 AWS_REGION=us-east-1
 STDOUT=true
"""

MINIMAL = {"MQTT_HOST": "broker.local", "TOPIC": "a/#", "KIN_STREAM_NAME": "s"}


def write_env(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text, encoding="utf-8")
    return path


def load(**env: str):
    return load_settings({**MINIMAL, **env})


def error_of(environ: dict[str, str], env_file: Path | None = None) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(environ, env_file)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_seed_env_with_leading_spaces_parses_into_one_legacy_route(tmp_path: Path) -> None:
    settings = load_settings({}, write_env(tmp_path, SEED_ENV))
    assert settings.mqtt.host == "public.mqtthq.com"
    assert settings.mqtt.port == 1883
    assert settings.mqtt.transport == "tcp" and settings.mqtt.tls is False
    assert settings.mqtt.client_id == "client-123"
    assert settings.mqtt.username is None and settings.mqtt.password is None
    assert settings.legacy_route == LegacyRoute("homeassistant/sensor/#", "kinesis-data-stream",
                                                "sensor-data", 0)
    assert settings.mqtt.persistent is False
    assert settings.backlog == 2000
    assert settings.kinesis.max_in_flight == 10
    assert settings.aws.session_name == "mysession-1234"
    assert settings.aws.region == "us-east-1"
    assert settings.aws.assume_role_arn.endswith("role/service-role/kinesis-endpoint-access")
    assert settings.stdout is True
    assert settings.routes_file is None


def test_seed_env_with_crlf_line_endings_and_bom_parses(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_bytes(b"\xef\xbb\xbf" + SEED_ENV.replace("\n", "\r\n").encode())
    settings = load_settings({}, path)
    assert settings.mqtt.port == 1883 and settings.mqtt.host == "public.mqtthq.com"


def test_aws_values_from_the_env_file_are_returned_for_boto3_not_exported(tmp_path: Path) -> None:
    settings = load_settings({}, write_env(tmp_path, SEED_ENV))
    overrides = dict(settings.aws_env_overrides)
    assert overrides["AWS_ACCESS_KEY_ID"] == "AKIDEXAMPLE"
    assert overrides["AWS_SECRET_ACCESS_KEY"] == "wJalrXUtnFEMI-seed-secret"
    assert overrides["AWS_REGION"] == overrides["AWS_DEFAULT_REGION"] == "us-east-1"
    assert "AWS_ASSUME_ROLE_ARN" not in overrides


def test_endpoint_urls_from_the_env_file_reach_boto3(tmp_path: Path) -> None:
    path = write_env(tmp_path, SEED_ENV + "AWS_ENDPOINT_URL_KINESIS=http://127.0.0.1:4567\n")
    overrides = load_settings({}, path).aws_env_overrides
    assert overrides["AWS_ENDPOINT_URL_KINESIS"] == "http://127.0.0.1:4567"


def test_environment_wins_over_the_env_file_and_is_not_repeated_in_overrides(
        tmp_path: Path) -> None:
    environ = {"PORT": "1999", "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1",
               "AWS_ACCESS_KEY_ID": "AKIDENV"}
    settings = load_settings(environ, write_env(tmp_path, SEED_ENV))
    assert settings.mqtt.port == 1999
    assert settings.aws.region == "eu-west-1"
    assert "AWS_ACCESS_KEY_ID" not in settings.aws_env_overrides
    assert "AWS_REGION" not in settings.aws_env_overrides


def test_documented_name_wins_over_its_seed_alias() -> None:
    settings = load(BROKER="old.example", MQTT_HOST="new.example", PORT="1", MQTT_PORT="2")
    assert (settings.mqtt.host, settings.mqtt.port) == ("new.example", 2)


def test_shell_user_is_ignored_but_user_in_the_env_file_is_used(tmp_path: Path) -> None:
    shell = {**MINIMAL, "USER": "alice", "PASS": "shell-pass"}
    assert load_settings(shell).mqtt.username is None
    assert load_settings(shell).mqtt.password is None
    path = write_env(tmp_path, " USER=sensor-gw\n PASS=s3cret\n")
    settings = load_settings(shell, path)
    assert settings.mqtt.username == "sensor-gw"
    assert settings.mqtt.password == "s3cret"


def test_empty_user_and_pass_in_the_env_file_mean_no_credentials(tmp_path: Path) -> None:
    path = write_env(tmp_path, " USER=\n PASS=\n")
    settings = load_settings({**MINIMAL, "USER": "alice"}, path)
    assert settings.mqtt.username is None and settings.mqtt.password is None


def test_unambiguous_names_win_over_user_and_pass(tmp_path: Path) -> None:
    path = write_env(tmp_path, " USER=seed\n PASS=seed-pass\n")
    settings = load_settings({**MINIMAL, "MQTT_USERNAME": "gw", "MQTT_PASSWORD": "pw"}, path)
    assert (settings.mqtt.username, settings.mqtt.password) == ("gw", "pw")


def test_credential_files_are_read_with_one_trailing_newline_stripped(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("gw\n")
    (tmp_path / "pass").write_text("pa ss\n\n")
    settings = load(MQTT_USERNAME_FILE=str(tmp_path / "user"),
                    MQTT_PASSWORD_FILE=str(tmp_path / "pass"))
    assert settings.mqtt.username == "gw"
    assert settings.mqtt.password == "pa ss\n"


def test_unreadable_credential_file_names_the_variable(tmp_path: Path) -> None:
    message = error_of({**MINIMAL, "MQTT_PASSWORD_FILE": str(tmp_path / "missing")})
    assert message.startswith("MQTT_PASSWORD_FILE: cannot read")


def test_password_and_password_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "pass").write_text("x")
    message = error_of({**MINIMAL, "MQTT_PASSWORD": "hunter2",
                        "MQTT_PASSWORD_FILE": str(tmp_path / "pass")})
    assert "use one" in message and "hunter2" not in message


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("PORT", "abc", "PORT: expected an integer 1-65535, got 'abc'"),
    ("MQTT_PORT", "70000", "MQTT_PORT: expected an integer 1-65535, got '70000'"),
    ("QOS", "2", "QOS: QoS 2 is not supported"),
    ("STDOUT", "maybe", "STDOUT: expected true or false, got 'maybe'"),
    ("MQTT_PROTOCOL", "3.1", "MQTT_PROTOCOL: expected one of 5, 3.1.1, got '3.1'"),
    ("KINESIS_LINGER_MS", "-1", "KINESIS_LINGER_MS: expected a number of milliseconds"),
    ("KINESIS_BATCH_RECORDS", "501", "KINESIS_BATCH_RECORDS: expected an integer 1-500"),
    ("LOG_FORMAT", "xml", "LOG_FORMAT: expected one of auto, json, text, got 'xml'"),
    ("BROKER", "http://h", "BROKER: unknown scheme"),
    ("MQTT_SHARE_GROUP", "$share/g/", "MQTT_SHARE_GROUP: expected a group name"),
    ("AWS_ASSUME_ROLE_ARN", "role", "AWS_ASSUME_ROLE_ARN: expected a role ARN"),
    ("KINESIS_MAX_IN_FLIGHT", "0", "KINESIS_MAX_IN_FLIGHT: expected an integer 1-256"),
    ("KINESIS_MAX_RECORD_BYTES", "0", "KINESIS_MAX_RECORD_BYTES: expected an integer"),
    ("KINESIS_RETRY_BASE_MS", "0", "KINESIS_RETRY_BASE_MS: expected a number of milliseconds"),
    ("KIN_SESSION_NAME", "x", "KIN_SESSION_NAME: expected 2-64 of"),
])
def test_invalid_values_give_one_line_naming_the_variable(name: str, value: str,
                                                          expected: str) -> None:
    environ = {**MINIMAL, name: value}
    if name == "BROKER":
        del environ["MQTT_HOST"]
    assert error_of(environ).startswith(expected)


@pytest.mark.parametrize(("env", "expected"), [
    ({"KINESIS_BATCH_BYTES": "1000", "KINESIS_MAX_RECORD_BYTES": "1001"},
     "KINESIS_MAX_RECORD_BYTES: 1001 exceeds KINESIS_BATCH_BYTES 1000"),
    ({"KINESIS_RETRY_BASE_MS": "500", "KINESIS_RETRY_CAP_MS": "400"},
     "KINESIS_RETRY_CAP_MS: is below KINESIS_RETRY_BASE_MS"),
])
def test_sink_limits_that_depend_on_each_other_are_checked_once_by_the_loader(
        env: dict[str, str], expected: str) -> None:
    assert error_of({**MINIMAL, **env}) == expected


def test_the_kinesis_settings_are_the_sink_config_and_the_aws_settings_apart() -> None:
    settings = load(KINESIS_LINGER_MS="7", KINESIS_BATCH_RECORDS="9", KINESIS_RETRY_CAP_MS="900",
                    AWS_REGION="ap-south-1", KIN_SESSION_NAME="edge-7")
    assert settings.kinesis == SinkConfig(linger_s=0.007, max_batch_records=9, backoff_cap_s=0.9,
                                          max_in_flight=4, record_ttl_s=0)
    assert settings.aws == AwsSettings(region="ap-south-1", assume_role_arn=None, session_name="edge-7")


def test_the_settings_package_imports_no_aws_library() -> None:
    """gateway.settings sits below the sink in the layering; only the sink may import boto3."""
    package = Path(settings_module.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in {"boto3", "botocore"} for n in names), path.name


def test_invalid_value_from_the_env_file_names_file_and_line(tmp_path: Path) -> None:
    path = write_env(tmp_path, " BROKER=b\n PORT=abc\n TOPIC=t\n KIN_STREAM_NAME=s\n")
    assert error_of({}, path) == f"{path}:2: PORT: expected an integer 1-65535, got 'abc'"


def test_unparsable_env_file_line_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = write_env(tmp_path, " BROKER=b\nthis is not an assignment\n")
    assert error_of({}, path).startswith(f"{path}:2: cannot parse")


def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    assert "cannot read the .env file" in error_of(MINIMAL, tmp_path / "nope.env")


def test_kubernetes_service_link_in_mqtt_port_gets_a_hint() -> None:
    message = error_of({**MINIMAL, "MQTT_PORT": "tcp://10.96.0.7:1883"})
    assert "enableServiceLinks" in message


def test_missing_routes_and_legacy_names_says_what_is_missing() -> None:
    message = error_of({"MQTT_HOST": "h", "TOPIC": "a/b"})
    assert message.startswith("GATEWAY_ROUTES: not set")
    assert "KIN_STREAM_NAME missing" in message


def test_missing_broker_is_an_error() -> None:
    assert error_of({"TOPIC": "a", "KIN_STREAM_NAME": "s"}).startswith("MQTT_HOST: not set")


def test_route_file_replaces_the_legacy_route() -> None:
    settings = load_settings({"MQTT_HOST": "h", "GATEWAY_ROUTES": "/etc/routes.yaml",
                              "TOPIC": "ignored", "KIN_STREAM_NAME": "ignored"})
    assert settings.routes_file == "/etc/routes.yaml"
    assert settings.legacy_route is None
    assert settings.mqtt.persistent is None  # decided by the route table


def test_persistent_mqtt5_session_that_expires_at_once_is_refused_in_one_line() -> None:
    message = error_of({**MINIMAL, "QOS": "1", "MQTT_SESSION_EXPIRY_S": "0"})
    assert message.startswith("MQTT_SESSION_EXPIRY_S: 0 ends the session at every disconnect")
    routed = load_settings({"MQTT_HOST": "h", "GATEWAY_ROUTES": "routes.yaml", "MQTT_SESSION_EXPIRY_S": "0"}).mqtt
    with pytest.raises(SettingsError, match=r"^MQTT_SESSION_EXPIRY_S: ") as info:
        replace(routed, persistent=True)       # what the app does once the route table wants QoS 1
    assert "\n" not in str(info.value)
    assert replace(routed, protocol="3.1.1", persistent=True).persistent is True


def test_legacy_route_without_partition_key_uses_the_topic_and_qos1_is_persistent() -> None:
    settings = load(QOS="1")
    assert settings.legacy_route == LegacyRoute("a/#", "s", None, 1)
    assert settings.mqtt.persistent is True


def test_invalid_legacy_topic_filter_is_refused() -> None:
    message = error_of({**MINIMAL, "TOPIC": "a/#/b"})
    assert message.startswith("TOPIC: not a valid MQTT topic filter")


@pytest.mark.parametrize(("broker", "host", "port", "transport", "tls", "path"), [
    ("tcp://b.example", "b.example", 1883, "tcp", False, "/mqtt"),
    ("ssl://b.example", "b.example", 8883, "tcp", True, "/mqtt"),
    ("mqtts://b.example:9883", "b.example", 9883, "tcp", True, "/mqtt"),
    ("ws://b.example:8080", "b.example", 8080, "websockets", False, "/mqtt"),
    ("wss://b.example/ws", "b.example", 443, "websockets", True, "/ws"),
    ("b.example:1884", "b.example", 1884, "tcp", False, "/mqtt"),
    ("[::1]:1885", "::1", 1885, "tcp", False, "/mqtt"),
])
def test_broker_url_scheme_sets_transport_tls_and_port(
        broker: str, host: str, port: int, transport: str, tls: bool, path: str) -> None:
    environ = {"BROKER": broker, "TOPIC": "t", "KIN_STREAM_NAME": "s"}
    mqtt = load_settings(environ).mqtt
    assert (mqtt.host, mqtt.port, mqtt.transport, mqtt.tls, mqtt.ws_path) == (
        host, port, transport, tls, path)


def test_seed_port_applies_to_a_scheme_without_port_and_websocket_port_to_websockets() -> None:
    base = {"TOPIC": "t", "KIN_STREAM_NAME": "s", "PORT": "8884", "WEBSOCKET": "8080"}
    assert load_settings({**base, "BROKER": "ssl://b"}).mqtt.port == 8884
    mqtt = load_settings({**base, "BROKER": "b", "MQTT_TRANSPORT": "websockets"}).mqtt
    assert (mqtt.transport, mqtt.port) == ("websockets", 8080)


def test_tls_false_with_a_tls_scheme_is_a_conflict() -> None:
    environ = {"BROKER": "ssl://b", "MQTT_TLS": "false", "TOPIC": "t", "KIN_STREAM_NAME": "s"}
    assert error_of(environ).startswith("MQTT_TLS: is false but the BROKER URL scheme requires TLS")


def test_credentials_in_the_broker_url_are_refused_without_echoing_them() -> None:
    message = error_of({**MINIMAL, "MQTT_HOST": "mqtt://u:topsecret@b"})
    assert "topsecret" not in message and message.startswith("MQTT_HOST:")


def test_ca_file_turns_tls_on_and_must_exist(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    mqtt = load(MQTT_TLS_CA_FILE=str(ca)).mqtt
    assert mqtt.tls is True and mqtt.port == 8883 and mqtt.ca_file == str(ca)
    assert error_of({**MINIMAL, "MQTT_TLS_CA_FILE": str(tmp_path / "x")}).startswith(
        "MQTT_TLS_CA_FILE: no such file")


def test_defaults_match_the_documented_ones() -> None:
    settings = load()
    mqtt, kinesis = settings.mqtt, settings.kinesis
    assert mqtt.client_id.startswith("mqtt-kinesis-gateway-")
    assert (mqtt.protocol, mqtt.keepalive_s, mqtt.session_expiry_s, mqtt.receive_maximum) == (
        "5", 30, 86400, 1000)
    assert (mqtt.reconnect_min_s, mqtt.reconnect_max_s, mqtt.share_group) == (1, 30, None)
    assert mqtt.read_interval_s == 0.1
    assert (kinesis.max_in_flight, kinesis.linger_s, kinesis.max_batch_records) == (4, 0.2, 500)
    assert (kinesis.max_batch_bytes, kinesis.max_record_bytes) == (5 * 2**20, 2**20)
    assert (kinesis.backoff_base_s, kinesis.backoff_cap_s, kinesis.record_ttl_s) == (0.1, 10, 0)
    assert (settings.aws.region, settings.aws.assume_role_arn, settings.aws.session_name) == (
        None, None, "mqtt-kinesis-gateway")
    assert (settings.http.host, settings.http.port) == ("0.0.0.0", 8081)
    assert (settings.logging.format, settings.logging.level) == ("auto", "INFO")
    assert (settings.reload.mode, settings.reload.debounce_s, settings.reload.rescan_s) == (
        "inotify", 0.2, 30)
    assert (settings.backlog, settings.workers, settings.shutdown_timeout_s) == (20000, 1, 20)
    assert settings.stdout is False


def test_repr_never_shows_secrets(tmp_path: Path) -> None:
    path = write_env(tmp_path, SEED_ENV.replace(" PASS=\n", " PASS=mqtt-pa55\n")
                     .replace(" USER=\n", " USER=gw\n"))
    settings = load_settings({}, path)
    text = repr(settings)
    assert "mqtt-pa55" not in text and "wJalrXUtnFEMI-seed-secret" not in text
    assert "mqtt-pa55" in settings.secret_values
    assert "wJalrXUtnFEMI-seed-secret" in settings.secret_values


def test_half_of_a_static_aws_key_pair_is_an_error() -> None:
    assert error_of({**MINIMAL, "AWS_ACCESS_KEY_ID": "AKID"}).startswith(
        "AWS_SECRET_ACCESS_KEY: not set, but AWS_ACCESS_KEY_ID is")


def test_password_without_username_is_refused_on_mqtt_311(tmp_path: Path) -> None:
    message = error_of({**MINIMAL, "MQTT_PROTOCOL": "3.1.1", "MQTT_PASSWORD": "p"})
    assert message.startswith("MQTT_PASSWORD:") and "'p'" not in message


def test_http_port_zero_disables_the_listener() -> None:
    assert load(HTTP_PORT="0").http.enabled is False


def test_env_file_is_found_from_gateway_env_file_or_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_env_file({}) is None
    (tmp_path / ".env").write_text(" PORT=1\n")
    assert find_env_file({}) == ".env"
    assert find_env_file({"GATEWAY_ENV_FILE": "/run/gw.env"}) == "/run/gw.env"


DOCUMENTED = ["GATEWAY_ROUTES", "TOPIC", "KIN_STREAM_NAME", "KIN_PARTITION_KEY", "QOS", "MQTT_HOST", "BROKER", "MQTT_PORT", "PORT", "MQTT_TRANSPORT", "MQTT_WS_PATH", "WEBSOCKET", "MQTT_PROTOCOL", "MQTT_CLIENT_ID", "CLIENTID", "MQTT_KEEPALIVE_S", "MQTT_SESSION_EXPIRY_S", "MQTT_RECEIVE_MAXIMUM", "MQTT_SHARE_GROUP", "MQTT_RECONNECT_MIN_S", "MQTT_RECONNECT_MAX_S", "MQTT_USERNAME", "MQTT_PASSWORD", "MQTT_USERNAME_FILE", "MQTT_PASSWORD_FILE", "USER", "PASS", "MQTT_TLS", "MQTT_TLS_CA_FILE", "MQTT_TLS_CERT_FILE", "MQTT_TLS_KEY_FILE", "MQTT_TLS_INSECURE", "MQTT_TLS_ALPN", "KINESIS_MAX_IN_FLIGHT", "KIN_MAXCONN", "KINESIS_LINGER_MS", "KINESIS_BATCH_RECORDS", "KINESIS_BATCH_BYTES", "KINESIS_MAX_RECORD_BYTES", "KINESIS_RETRY_BASE_MS", "KINESIS_RETRY_CAP_MS", "KINESIS_RECORD_TTL_S", "GATEWAY_BACKLOG", "BACKLOG_COUNT", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ASSUME_ROLE_ARN", "KIN_SESSION_NAME", "AWS_ENDPOINT_URL_KINESIS", "AWS_ENDPOINT_URL", "HTTP_HOST", "HTTP_PORT", "LOG_FORMAT", "LOG_LEVEL", "STDOUT", "GATEWAY_SHUTDOWN_TIMEOUT_S", "GATEWAY_RELOAD", "GATEWAY_RELOAD_DEBOUNCE_MS", "GATEWAY_RELOAD_RESCAN_S", "GATEWAY_WORKERS", "GATEWAY_ENV_FILE"]

EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


def test_env_example_documents_every_setting() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    missing = [name for name in DOCUMENTED if name not in text]
    assert missing == []


def test_env_example_with_every_line_uncommented_loads(tmp_path: Path) -> None:
    kept = []
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and "=" in line.split()[0] and line[1].isupper():
            line = line[1:]
        if "_FILE=" not in line:  # secret and certificate files do not exist here
            kept.append(line)
    settings = load_settings({}, write_env(tmp_path, "\n".join(kept) + "\n"))
    assert settings.routes_file == "routes.yaml"
    assert settings.mqtt.host == "localhost" and settings.mqtt.share_group == "gateway"
    assert settings.aws_env_overrides["AWS_ENDPOINT_URL_KINESIS"] == "http://localhost:4566"
