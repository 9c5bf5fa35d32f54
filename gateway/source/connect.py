"""From `MqttConfig` to a configured paho client: the only place connection options are decided.

Why apart from the source: these are the choices that decide whether delivery survives a restart
(paho's MQTT 5 default `clean_start` wipes the session, docs/delivery.md#persistent-session: use
clean_start=False and SessionExpiryInterval > 0, or clean_session=False on 3.1.1) and whether TLS
verifies the broker (on unless `tls_insecure` is set explicitly). They are easy to review and test
in one screen.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.settings.settings import MqttConfig
from gateway.source import fastpath

__all__ = ["MqttSourceError", "build_client", "describe_error"]

log = logging.getLogger("gateway.source.mqtt")


class MqttSourceError(Exception):
    """A configuration the source cannot start with (single-line message)."""


def describe_error(exc: BaseException) -> str:
    """A connect failure as one readable line (never a traceback)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        text = f"TLS certificate verification failed: {exc.verify_message}"
    elif isinstance(exc, ssl.SSLError):
        text = f"TLS error: {exc.reason or exc}"
    elif isinstance(exc, ConnectionRefusedError):
        text = "connection refused"
    elif isinstance(exc, socket.gaierror):
        text = f"cannot resolve host: {exc.strerror}"
    elif isinstance(exc, (TimeoutError, socket.timeout)):
        text = "connect timed out"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def _alpn_context(c: MqttConfig) -> ssl.SSLContext:
    """What paho's tls_set builds (verification on, the CA file or the system's CAs, the client
    certificate), plus the ALPN protocols: AWS IoT Core takes MQTT with client certificates on
    port 443 only when the client offers `x-amzn-mqtt-ca`."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=c.ca_file)
    if c.cert_file:
        context.load_cert_chain(c.cert_file, c.key_file)
    if c.tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(list(c.tls_alpn))
    return context


def build_client(config: MqttConfig, factory: Callable[..., Any] = paho.Client) -> Any:
    """A paho client (VERSION2 callbacks, manual acks) ready for `reconnect()`; no I/O yet."""
    c = config
    if c.persistent is None:
        raise MqttSourceError("MqttConfig.persistent is undecided: resolve it from the route table first")
    v5 = c.protocol == "5"
    kwargs: dict[str, Any] = {
        "client_id": c.client_id, "transport": c.transport, "manual_ack": True,
        "protocol": MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
    }
    if not v5:
        kwargs["clean_session"] = not c.persistent
    if c.share_group and not v5:
        log.warning("MQTT_SHARE_GROUP=%s with MQTT_PROTOCOL=3.1.1: the broker cannot be asked whether it supports "
                    "shared subscriptions; one that does not (aedes, amqtt) takes $share/%s/... as a plain filter "
                    "and the gateway receives nothing (docs/delivery.md#shared-subscriptions)", c.share_group,
                    c.share_group)
    fastpath.install()
    client = factory(CallbackAPIVersion.VERSION2, **kwargs)
    client.suppress_exceptions = True       # a second net under our own callback guards
    # paho repeats a connection error on every retry ("failed to receive on socket"); the source
    # logs each connection state change itself, once, with the likely cause. paho's own lines are
    # kept for LOG_LEVEL=DEBUG; otherwise paho gets no logger, since it formats two lines for
    # every message it handles.
    paho_log = logging.getLogger("gateway.source.paho")
    if paho_log.isEnabledFor(logging.DEBUG):
        client.enable_logger(paho_log)
    if c.transport == "websockets":
        client.ws_set_options(path=c.ws_path)
    if c.tls or c.ca_file:
        try:
            if c.tls_alpn:
                client.tls_set_context(_alpn_context(c))
            else:
                client.tls_set(ca_certs=c.ca_file, certfile=c.cert_file, keyfile=c.key_file,
                               cert_reqs=ssl.CERT_NONE if c.tls_insecure else ssl.CERT_REQUIRED)
        except (OSError, ValueError) as exc:
            raise MqttSourceError(f"TLS setup failed: {describe_error(exc)}") from None
        if c.tls_insecure:
            client.tls_insecure_set(True)
            log.warning("MQTT TLS certificate verification is turned OFF (tls_insecure)")
    if c.username:
        client.username_pw_set(c.username, c.password)
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = c.receive_maximum
        if c.persistent:
            props.SessionExpiryInterval = c.session_expiry_s
        client.connect_async(c.host, c.port, c.keepalive_s,
                             clean_start=not c.persistent, properties=props)
    else:
        client.connect_async(c.host, c.port, c.keepalive_s)
    return client
