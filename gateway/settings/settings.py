"""Process settings from the environment and an optional ``.env`` file.

Every tunable has one documented name, a default and a single-line error when it is wrong. The Go
bridge's names (``BROKER``, ``PORT``, ``TOPIC``, ``KIN_STREAM_NAME``...) stay accepted as aliases
so its users' ``.env`` files keep working, leading spaces included.

Precedence: the process environment wins over the ``.env`` file, and a documented name wins over
its seed alias. The exception is ``USER``/``PASS``: ``USER`` is the login name in every shell, so
the pair is read only from the ``.env`` file, and an empty value there means "no credentials".

This module never mutates ``os.environ``: AWS variables that only the ``.env`` file carries are
returned in ``Settings.aws_env_overrides`` for the app to export before it creates a Kinesis client.

The broker connection's settings are read in ``mqtt.py``, the spool's in ``spool.py``; their configs
are exported here too, so that the settings have one import for the rest of the gateway.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple, cast

from gateway.model import MAX_PARTITION_KEY_CHARS, MAX_RECORD_BYTES, MAX_REQUEST_BYTES, MAX_REQUEST_RECORDS
from gateway.settings.environment import SettingsError, Source, find_env_file, read_env_file, words
from gateway.settings.mqtt import MqttConfig, mqtt_config
from gateway.settings.spool import SpoolSettings, spool_ignored, spool_settings

__all__ = [
    "AwsSettings", "HttpSettings", "LegacyRoute", "LoggingSettings", "MqttConfig",
    "ReloadSettings", "Settings", "SettingsError", "SinkConfig", "SpoolSettings", "find_env_file", "load_settings",
]

_MIB = 1024 * 1024
_STREAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_STREAM_ARN = re.compile(r"arn:aws[a-z-]*:kinesis:[a-z0-9-]+:\d{12}:stream/[A-Za-z0-9_.-]{1,128}")
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/\S+")
_SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}")
_LogFormat = Literal["auto", "json", "text"]
_ReloadMode = Literal["inotify", "polling", "off"]


class LegacyRoute(NamedTuple):
    """The seed's single route: ``RouteTable.legacy(*settings.legacy_route)``."""

    topic: str
    stream: str
    partition_key: str | None  # static key (KIN_PARTITION_KEY); None: the message's topic
    qos: int


@dataclass(frozen=True, kw_only=True)
class SinkConfig:
    """What the Kinesis sink takes: its batching and retry tunables.

    ``load_settings`` validates every field, naming the environment variable in its error. The
    defaults are the PutRecords limits and KPL-like timings, for tests and tools that build a sink
    themselves; the process's own defaults are those of ``load_settings`` (docs/settings.md).
    """

    max_batch_records: int = MAX_REQUEST_RECORDS
    max_batch_bytes: int = MAX_REQUEST_BYTES
    max_record_bytes: int = MAX_RECORD_BYTES
    linger_s: float = 0.05
    max_in_flight: int = 4
    backoff_base_s: float = 0.1
    backoff_cap_s: float = 10.0
    record_ttl_s: float = 0.0  # 0: retry retryable errors forever
    aggregation_max_bytes: int = 51200


@dataclass(frozen=True, kw_only=True)
class AwsSettings:
    """What the AWS clients are made with; the credentials themselves come from the SDKs' default chain."""

    region: str | None
    assume_role_arn: str | None
    session_name: str


@dataclass(frozen=True, kw_only=True)
class HttpSettings:
    host: str
    port: int  # 0: no HTTP listener

    @property
    def enabled(self) -> bool:
        return self.port != 0


@dataclass(frozen=True, kw_only=True)
class LoggingSettings:
    format: _LogFormat
    level: str


@dataclass(frozen=True, kw_only=True)
class ReloadSettings:
    mode: _ReloadMode
    debounce_s: float
    rescan_s: float


@dataclass(frozen=True, kw_only=True)
class Settings:
    routes_file: str | None
    legacy_route: LegacyRoute | None
    mqtt: MqttConfig
    kinesis: SinkConfig
    aws: AwsSettings
    http: HttpSettings
    logging: LoggingSettings
    reload: ReloadSettings
    backlog: int
    backlog_bytes: int
    workers: int
    shutdown_timeout_s: float
    stdout: bool
    env_file: str | None
    spool: SpoolSettings | None = None
    """None without GATEWAY_SPOOL_DIR: records wait in memory and messages are acked after Kinesis."""
    aws_env_overrides: Mapping[str, str] = field(repr=False, compare=False, hash=False)
    secret_values: tuple[str, ...] = field(repr=False, compare=False)
    """MQTT password, AWS secret key and session token: register them with the log redaction."""
    ignored: tuple[str, ...] = ()
    """One line per setting that is set but has no effect here, for a start-up warning."""


def load_settings(environ: Mapping[str, str] | None = None,
                  env_file: str | os.PathLike[str] | None = None) -> Settings:
    """Build the settings once at startup; every problem is a single-line ``SettingsError``."""
    environ = os.environ if environ is None else environ
    path = os.fspath(env_file) if env_file is not None else None
    values, lines = read_env_file(path) if path is not None else ({}, {})
    src = Source(environ, values, lines, path)

    mqtt = mqtt_config(src)
    routes_file = src.text("GATEWAY_ROUTES")
    legacy = None if routes_file else _legacy_route(src)
    if legacy is not None:
        mqtt = replace(mqtt, persistent=legacy.qos >= 1)
    kinesis = _kinesis(src)
    ignored = _ignored(src, routes_file is not None, mqtt.transport)
    aws = _aws(src)
    return Settings(
        ignored=ignored,
        routes_file=routes_file,
        legacy_route=legacy,
        mqtt=mqtt,
        kinesis=kinesis,
        aws=aws,
        http=HttpSettings(host=src.text("HTTP_HOST", default="0.0.0.0") or "0.0.0.0",
                          port=src.integer("HTTP_PORT", default=8081, lo=0, hi=65535)),
        logging=LoggingSettings(
            format=cast(_LogFormat, src.choice("LOG_FORMAT", "auto", words("auto json text"))),
            level=src.choice("LOG_LEVEL", "INFO", {
                "debug": "DEBUG", "info": "INFO", "warning": "WARNING", "warn": "WARNING",
                "error": "ERROR", "critical": "CRITICAL"})),
        reload=ReloadSettings(
            mode=cast(_ReloadMode, src.choice("GATEWAY_RELOAD", "inotify",
                                              words("inotify polling off"))),
            debounce_s=src.millis("GATEWAY_RELOAD_DEBOUNCE_MS", default=200, lo=0),
            rescan_s=src.number("GATEWAY_RELOAD_RESCAN_S", default=30, lo=0)),
        backlog=src.integer("GATEWAY_BACKLOG", "BACKLOG_COUNT", default=20000, lo=1, hi=10_000_000),
        backlog_bytes=src.integer("GATEWAY_BACKLOG_BYTES", default=64 * _MIB, lo=_MIB, hi=2**40),
        workers=src.integer("GATEWAY_WORKERS", default=1, lo=1, hi=64),
        shutdown_timeout_s=src.number("GATEWAY_SHUTDOWN_TIMEOUT_S", default=20, lo=0),
        stdout=src.boolean("STDOUT", default=False),
        env_file=path,
        spool=spool_settings(src),
        aws_env_overrides=types.MappingProxyType(_aws_overrides(values, environ, aws)),
        secret_values=tuple(v.text for v in (
            src.get("AWS_SECRET_ACCESS_KEY"), src.get("AWS_SESSION_TOKEN")) if v)
        + ((mqtt.password,) if mqtt.password else ()),
    )


_SINGLE_ROUTE_NAMES = ("TOPIC", "KIN_STREAM_NAME", "KIN_PARTITION_KEY", "QOS")


def _ignored(src: Source, have_route_file: bool, transport: str) -> tuple[str, ...]:
    """Settings that are set but do nothing with the rest of the configuration."""
    lines = []
    if have_route_file:
        lines += [f"{name} is ignored: GATEWAY_ROUTES names a route file, which decides topics, streams,"
                  " keys and QoS" for name in _SINGLE_ROUTE_NAMES if src.get(name) is not None]
    if transport != "websockets" and src.get("WEBSOCKET") is not None:
        lines.append("WEBSOCKET is ignored: the transport is tcp (set MQTT_TRANSPORT=websockets to use it)")
    if transport != "websockets" and src.get("MQTT_WS_PATH") is not None:
        lines.append("MQTT_WS_PATH is ignored: the transport is tcp")
    return tuple(lines + spool_ignored(src))


def _legacy_route(src: Source) -> LegacyRoute:
    topic_value, stream_value = src.get("TOPIC"), src.get("KIN_STREAM_NAME")
    if topic_value is None or stream_value is None:
        missing = " and ".join(name for name, value in (("TOPIC", topic_value),
                                                        ("KIN_STREAM_NAME", stream_value))
                               if value is None)
        raise SettingsError(f"GATEWAY_ROUTES: not set, and the single-route settings are incomplete"
                            f" ({missing} missing); set GATEWAY_ROUTES to a route file, or TOPIC"
                            " and KIN_STREAM_NAME")
    topic = topic_value.text.strip()
    levels = topic.split("/")
    bad = ("\0" in topic or len(topic.encode()) > 65535
           or any(("#" in lv and (lv != "#" or i != len(levels) - 1)) or ("+" in lv and lv != "+")
                  for i, lv in enumerate(levels)))
    if bad:
        raise src.error(topic_value, "not a valid MQTT topic filter ('+' and '#' must fill a level;"
                        " '#' only last)")
    stream = stream_value.text.strip()
    if not (_STREAM_NAME.fullmatch(stream) or _STREAM_ARN.fullmatch(stream)):
        raise src.error(stream_value, "expected a stream name (1-128 of A-Z a-z 0-9 _ . -) or a"
                        " stream ARN")
    key_value = src.get("KIN_PARTITION_KEY")
    key = key_value.text.strip() if key_value else None
    if key_value and len(key_value.text.strip()) > MAX_PARTITION_KEY_CHARS:
        raise src.error(key_value, f"a partition key is at most {MAX_PARTITION_KEY_CHARS} characters", show=False)
    qos_value = src.get("QOS")
    qos = 0 if qos_value is None else {"0": 0, "1": 1}.get(qos_value.text.strip(), -1)
    if qos_value is not None and qos < 0:
        reason = ("QoS 2 is not supported; use 0 or 1 (1 for at-least-once)" if qos_value.text.strip() == "2"
                  else "expected 0 or 1 (1 for at-least-once)")
        raise src.error(qos_value, reason)
    return LegacyRoute(topic, stream, key, qos)


def _kinesis(src: Source) -> SinkConfig:
    batch_bytes = src.integer("KINESIS_BATCH_BYTES", default=MAX_REQUEST_BYTES, lo=1, hi=10 * _MIB)
    max_record = src.integer("KINESIS_MAX_RECORD_BYTES", default=MAX_RECORD_BYTES, lo=1, hi=10 * _MIB)
    if max_record > batch_bytes:
        raise SettingsError(f"KINESIS_MAX_RECORD_BYTES: {max_record} exceeds KINESIS_BATCH_BYTES"
                            f" {batch_bytes}")
    retry_base = src.millis("KINESIS_RETRY_BASE_MS", default=100, lo=1)
    retry_cap = src.millis("KINESIS_RETRY_CAP_MS", default=10000, lo=1)
    if retry_cap < retry_base:
        raise SettingsError("KINESIS_RETRY_CAP_MS: is below KINESIS_RETRY_BASE_MS")
    return SinkConfig(
        max_in_flight=src.integer("KINESIS_MAX_IN_FLIGHT", "KIN_MAXCONN", default=4, lo=1, hi=256),
        linger_s=src.millis("KINESIS_LINGER_MS", default=200, lo=0),
        max_batch_records=src.integer("KINESIS_BATCH_RECORDS", default=MAX_REQUEST_RECORDS, lo=1,
                                      hi=MAX_REQUEST_RECORDS),
        max_batch_bytes=batch_bytes, max_record_bytes=max_record,
        backoff_base_s=retry_base, backoff_cap_s=retry_cap,
        record_ttl_s=src.number("KINESIS_RECORD_TTL_S", default=0, lo=0),
    )


def _aws(src: Source) -> AwsSettings:
    role_value = src.get("AWS_ASSUME_ROLE_ARN")
    if role_value and not _ROLE_ARN.fullmatch(role_value.text.strip()):
        raise src.error(role_value, "expected a role ARN like arn:aws:iam::123456789012:role/name")
    session_value = src.get("KIN_SESSION_NAME")
    if session_value and not _SESSION_NAME.fullmatch(session_value.text.strip()):
        raise src.error(session_value, "expected 2-64 of A-Z a-z 0-9 + = , . @ _ -")
    return AwsSettings(
        region=src.text("AWS_REGION", "AWS_DEFAULT_REGION"),
        assume_role_arn=role_value.text.strip() if role_value else None,
        session_name=session_value.text.strip() if session_value else "mqtt-kinesis-gateway",
    )


def _aws_overrides(file_values: Mapping[str, str | None],
                   environ: Mapping[str, str], aws: AwsSettings) -> dict[str, str]:
    """AWS_* variables only the .env file carries, for the AWS client (which reads os.environ itself)."""
    overrides = {name: text for name, text in file_values.items()
                 if name.startswith("AWS_") and name != "AWS_ASSUME_ROLE_ARN"
                 and text and not environ.get(name)}
    # the SDKs read the region from AWS_DEFAULT_REGION (botocore only from there); carry AWS_REGION over.
    if aws.region and not environ.get("AWS_DEFAULT_REGION"):
        overrides["AWS_DEFAULT_REGION"] = aws.region
    key_id = environ.get("AWS_ACCESS_KEY_ID") or file_values.get("AWS_ACCESS_KEY_ID")
    secret = environ.get("AWS_SECRET_ACCESS_KEY") or file_values.get("AWS_SECRET_ACCESS_KEY")
    if bool(key_id) != bool(secret):
        present, absent = (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if key_id
                           else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"))
        raise SettingsError(f"{absent}: not set, but {present} is (set both, or neither to use"
                            " the default credential chain)")
    return overrides
