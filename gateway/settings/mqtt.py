"""The MQTT broker connection's settings: the broker address (a host or a URL whose scheme sets
the transport and TLS), the TLS files, the protocol version, the session and the reconnect timing.

Apart from ``settings.py`` because the broker address alone has three spellings (``host``,
``host:port``, ``scheme://host[:port][/path]``) that must agree with MQTT_TRANSPORT, MQTT_TLS and
MQTT_PORT; every conflict is one ``SettingsError`` naming the variable (docs/settings.md).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from typing import Literal, cast
from urllib.parse import urlsplit

from gateway.settings.environment import SettingsError, Source, Value

__all__ = ["MqttConfig", "mqtt_config"]

_SCHEMES = {  # scheme -> (transport, tls)
    "tcp": ("tcp", False), "mqtt": ("tcp", False),
    "ssl": ("tcp", True), "tls": ("tcp", True), "mqtts": ("tcp", True),
    "ws": ("websockets", False), "wss": ("websockets", True),
}
_Transport = Literal["tcp", "websockets"]
_Protocol = Literal["5", "3.1.1"]


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    """The MQTT source's connection values, as ``mqtt_config`` validated them (one place: the
    loader, whose errors name the variables); the defaults live there and in docs/settings.md."""

    host: str
    port: int
    transport: _Transport
    ws_path: str
    protocol: _Protocol
    client_id: str
    username: str | None
    password: str | None = field(repr=False)
    keepalive_s: int
    session_expiry_s: int  # MQTT 5 only, used when persistent
    receive_maximum: int  # MQTT 5 only
    persistent: bool | None  # None: decided by the route table (persistent when any route is QoS 1)
    share_group: str | None
    tls: bool
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    tls_insecure: bool
    reconnect_min_s: float
    reconnect_max_s: float
    read_interval_s: float  # at most one read of a drained socket per interval (docs/performance.md)
    tls_alpn: tuple[str, ...] = ()  # TLS ALPN protocols offered (AWS IoT Core on 443: x-amzn-mqtt-ca)

    def __post_init__(self) -> None:
        # The one rule the loader cannot check alone: `persistent` may be decided later, by the
        # route table, and an MQTT 5 session that expires at once would lose what it queued.
        if self.persistent and self.protocol == "5" and self.session_expiry_s <= 0:
            raise SettingsError("MQTT_SESSION_EXPIRY_S: 0 ends the session at every disconnect, but QoS 1"
                                " routes need a persistent session; set it above 0")



def mqtt_config(src: Source) -> MqttConfig:
    """The broker connection from MQTT_* (and the seed's names); ``persistent`` is left to the caller."""
    host_value = src.get("MQTT_HOST", "BROKER")
    if host_value is None:
        raise SettingsError("MQTT_HOST: not set (the broker host, or a URL such as"
                            " mqtts://broker:8883; the seed name BROKER works too)")
    host, url_port, scheme_transport, scheme_tls, url_path = _parse_broker(src, host_value)

    transport_value = src.get("MQTT_TRANSPORT")
    transport = src.choice("MQTT_TRANSPORT", scheme_transport or "tcp",
                           {"tcp": "tcp", "websockets": "websockets", "ws": "websockets",
                            "websocket": "websockets"})
    if scheme_transport and transport_value and transport != scheme_transport:
        raise src.error(transport_value, f"conflicts with the {host_value.name} URL scheme")
    ca_file = src.path("MQTT_TLS_CA_FILE")
    cert_file = src.path("MQTT_TLS_CERT_FILE")
    key_file = src.path("MQTT_TLS_KEY_FILE")
    if key_file and not cert_file:
        raise SettingsError("MQTT_TLS_KEY_FILE: needs MQTT_TLS_CERT_FILE (the client certificate)")
    alpn_value = src.get("MQTT_TLS_ALPN")
    alpn = tuple(p.strip() for p in alpn_value.text.split(",") if p.strip()) if alpn_value else ()
    if alpn_value and alpn_value.text.strip() and (not alpn or any(not p.isascii() or len(p) > 255 for p in alpn)):
        raise src.error(alpn_value, "expected a comma-separated list of ALPN protocol names (e.g. x-amzn-mqtt-ca)")
    tls_value = src.get("MQTT_TLS")
    tls = src.boolean("MQTT_TLS", default=bool(scheme_tls or ca_file or cert_file or alpn))
    if alpn and not tls:
        raise SettingsError("MQTT_TLS_ALPN: is a TLS option, but MQTT_TLS is false")
    if scheme_tls and tls_value and not tls:
        raise src.error(tls_value, f"is false but the {host_value.name} URL scheme requires TLS")

    if url_port is not None:
        port = url_port
    elif transport == "websockets":
        port = src.integer("MQTT_PORT", "WEBSOCKET", default=443 if tls else 80, lo=1, hi=65535)
    else:
        port = src.integer("MQTT_PORT", "PORT", default=8883 if tls else 1883, lo=1, hi=65535)
    ws_path = url_path or src.text("MQTT_WS_PATH", default="/mqtt") or "/mqtt"
    if not ws_path.startswith("/"):
        ws_path = "/" + ws_path

    protocol = src.choice("MQTT_PROTOCOL", "5", {
        "5": "5", "5.0": "5", "v5": "5", "mqttv5": "5",
        "3.1.1": "3.1.1", "311": "3.1.1", "v311": "3.1.1", "mqttv311": "3.1.1", "4": "3.1.1"})
    username = src.secret("MQTT_USERNAME", "USER")
    password = src.secret("MQTT_PASSWORD", "PASS")
    if password is not None and username is None and protocol == "3.1.1":
        raise SettingsError("MQTT_PASSWORD: MQTT 3.1.1 does not allow a password without a"
                            " username (set MQTT_USERNAME)")
    share_value = src.get("MQTT_SHARE_GROUP")
    if share_value and re.search(r"[/+#\s]", share_value.text.strip()):
        raise src.error(share_value, "expected a group name without '/', '+', '#' or spaces")
    reconnect_min = src.number("MQTT_RECONNECT_MIN_S", default=1, lo=0.01)
    reconnect_max = src.number("MQTT_RECONNECT_MAX_S", default=30, lo=0.01)
    if reconnect_max < reconnect_min:
        raise SettingsError(f"MQTT_RECONNECT_MAX_S: {reconnect_max:g} is below"
                            f" MQTT_RECONNECT_MIN_S {reconnect_min:g}")
    return MqttConfig(
        host=host, port=port, transport=cast(_Transport, transport), ws_path=ws_path,
        protocol=cast(_Protocol, protocol),
        client_id=src.text("MQTT_CLIENT_ID", "CLIENTID")
        or f"mqtt-kinesis-gateway-{socket.gethostname()}",
        username=username, password=password,
        keepalive_s=src.integer("MQTT_KEEPALIVE_S", default=30, lo=1, hi=65535),
        session_expiry_s=src.integer("MQTT_SESSION_EXPIRY_S", default=86400, lo=0, hi=2**32 - 1),
        receive_maximum=src.integer("MQTT_RECEIVE_MAXIMUM", default=1000, lo=1, hi=65535),
        persistent=None,
        share_group=share_value.text.strip() if share_value else None,
        tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
        tls_insecure=src.boolean("MQTT_TLS_INSECURE", default=False),
        reconnect_min_s=reconnect_min, reconnect_max_s=reconnect_max,
        read_interval_s=src.millis("MQTT_READ_INTERVAL_MS", default=100, lo=0),
        tls_alpn=alpn,
    )


def _parse_broker(src: Source, value: Value
                  ) -> tuple[str, int | None, str | None, bool, str | None]:
    """host, port, transport, tls, ws path of ``host``, ``host:port``, ``scheme://host[:port]``."""
    text = value.text.strip()
    scheme = None
    if "://" in text:
        scheme, text = text.split("://", 1)
        scheme = scheme.lower()
        if scheme not in _SCHEMES:
            raise src.error(value, "unknown scheme; expected tcp://, ssl://, mqtts://, ws://"
                            " or wss://")
    if "@" in text:  # never echo: the part before @ may be a password
        raise src.error(value, "credentials in the URL are not supported; use MQTT_USERNAME and"
                        " MQTT_PASSWORD", show=False)
    if scheme is None and text.count(":") > 1 and not text.startswith("["):
        return text, None, None, False, None  # a bare IPv6 address
    try:
        parts = urlsplit("//" + text)
        port = parts.port
    except ValueError:
        raise src.error(value, "expected a host name with an optional :port (1-65535)") from None
    if not parts.hostname or parts.query or parts.fragment:
        raise src.error(value, "expected a host name with an optional :port")
    transport, tls = _SCHEMES[scheme] if scheme else (None, False)
    path = parts.path or None
    if path and transport != "websockets":
        raise src.error(value, "a path is only meaningful for ws:// and wss:// URLs")
    return parts.hostname, port, transport, tls, path
