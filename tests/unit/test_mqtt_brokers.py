"""How the MQTT source copes with brokers that differ: copies for overlapping subscriptions,
no shared subscriptions, retained messages, MQTT 5 refused, lost sessions.

Against the scripted fake paho client of test_mqtt_source (no broker, no network, no sleeps).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import test_mqtt_source as scripted

from gateway.source.subscriptions import SubscriptionBook, subscription_identifiers

fake = scripted.fake        # the fixture: a source on a scripted fake paho client
config = scripted.config

OVERLAPPING = [("factory/#", 1), ("+/+/welder/+/telemetry", 1)]


def _granted(made: Any) -> dict[str, int]:
    """Grant every SUBSCRIBE sent so far; filter -> the identifier it was subscribed with."""
    client = made.client
    ids = {}
    for _, mid, request in client.sent("subscribe"):
        client.fire_suback(mid, [q for _, q in request])
        for f, _ in request:
            ids[f] = client.identifiers.get(mid)
    return ids


# --- overlapping filters on MQTT 5 ---------------------------------------------------------------


def test_identifiers_are_a_stable_function_of_the_filter() -> None:
    first = subscription_identifiers(["factory/#", "+/+/welder/+/telemetry"])
    again = subscription_identifiers(["+/+/welder/+/telemetry", "factory/#", "other/#", "+/other/x"])
    assert first["factory/#"] == again["factory/#"]
    assert first["+/+/welder/+/telemetry"] == again["+/+/welder/+/telemetry"]
    assert all(1 <= i <= 268_435_455 for i in again.values()) and len(set(again.values())) == 4


def test_only_filters_that_share_a_topic_get_an_identifier() -> None:
    assert subscription_identifiers(["a/#", "b/+", "$SYS/#"]) == {}
    assert set(subscription_identifiers(["a/+/x", "a/y/+", "b/#"])) == {"a/+/x", "a/y/+"}


def test_each_filter_is_subscribed_with_its_own_identifier_on_mqtt5(fake: Any) -> None:
    made = fake(subscriptions=OVERLAPPING)
    made.client.fire_connect()
    ids = _granted(made)
    assert set(ids) == {"factory/#", "+/+/welder/+/telemetry"}
    assert None not in ids.values() and len(set(ids.values())) == 2


def test_one_copy_per_subscription_is_routed_once(fake: Any) -> None:
    made = fake(subscriptions=OVERLAPPING)
    client = made.client
    client.fire_connect()
    ids = _granted(made)
    both = b"factory/line1/welder/w7/telemetry"
    client.fire_message(both, b"{}", 1, identifiers=[ids["factory/#"]])
    client.fire_message(both, b"{}", 2, identifiers=[ids["+/+/welder/+/telemetry"]])
    client.fire_message(b"factory/other", b"{}", 3, identifiers=[ids["factory/#"]])
    client.fire_message(b"plant/l2/welder/w1/telemetry", b"{}", 4, identifiers=[ids["+/+/welder/+/telemetry"]])
    assert [m.topic for m in made.pipeline.messages] == [both.decode(), "factory/other",
                                                         "plant/l2/welder/w1/telemetry"]
    assert made.source.stats()["extra_copies"] == 1
    made.pipeline.acks.settle(made.pipeline.tickets)
    made.source.step()
    assert [a[1] for a in client.sent("ack")] == [1, 2, 3, 4]    # the extra copy is acked in order


def test_one_copy_naming_both_identifiers_is_routed(fake: Any) -> None:
    made = fake(subscriptions=OVERLAPPING)
    made.client.fire_connect()
    ids = _granted(made)
    made.client.fire_message(b"factory/l/welder/w/telemetry", b"{}", 1, identifiers=sorted(ids.values()))
    assert len(made.pipeline.messages) == 1 and made.source.stats()["extra_copies"] == 0


def test_copies_before_the_subacks_are_all_routed_never_lost(fake: Any) -> None:
    made = fake(subscriptions=OVERLAPPING)
    made.client.fire_connect(session_present=True)
    ids = subscription_identifiers(f for f, _ in OVERLAPPING)
    for mid, f in enumerate(ids, 1):      # a resumed session delivers before our SUBACKs are back
        made.client.fire_message(b"factory/l/welder/w/telemetry", b"{}", mid, identifiers=[ids[f]])
    assert len(made.pipeline.messages) == 2


def test_broker_without_identifiers_and_mqtt311_route_every_copy(fake: Any) -> None:
    made = fake(subscriptions=OVERLAPPING)
    made.client.fire_connect(SubscriptionIdentifierAvailable=0)
    assert set(_granted(made).values()) == {None}
    v311 = fake(config(protocol="3.1.1"), subscriptions=OVERLAPPING)
    v311.client.fire_connect()
    assert set(_granted(v311).values()) == {None}
    for m in (made, v311):
        m.client.fire_message(b"factory/l/welder/w/telemetry", b"{}", 1)
        m.client.fire_message(b"factory/l/welder/w/telemetry", b"{}", 2)
        assert len(m.pipeline.messages) == 2


def test_the_first_granted_subscription_keeps_its_copies_when_one_is_added() -> None:
    book = SubscriptionBook()
    book.set_desired([("+/+/welder/+/telemetry", 1)])
    book.new_connection(identifiers=True)
    subscribe, _ = book.plan()
    book.sent(1, subscribe)
    book.suback(1, [(1, "Granted QoS 1")])
    book.set_desired(OVERLAPPING)
    subscribe, _ = book.plan()
    book.sent(2, subscribe)
    book.suback(2, [(1, "Granted QoS 1")])
    old, new = book.identifier("+/+/welder/+/telemetry"), book.identifier("factory/#")
    assert old is not None and new is not None
    topic = "factory/l/welder/w/telemetry"
    # a message queued for the old subscription before the new one existed comes with its id only
    assert book.routed(topic, [old]) and not book.routed(topic, [new])
    assert book.routed("factory/x", [new])
    book.set_desired([("factory/#", 1)])        # removing the old one: its last copies still count
    book.plan()
    assert book.routed(topic, [old]) and book.routed(topic, [new])


def test_shared_filters_are_matched_without_their_prefix() -> None:
    book = SubscriptionBook("g")
    book.set_desired(OVERLAPPING)
    book.new_connection(identifiers=True)
    subscribe, _ = book.plan()
    book.sent(1, subscribe)
    book.suback(1, [(1, "Granted QoS 1")] * 2)
    a, b = (book.identifier(f"$share/g/{f}") for f, _ in OVERLAPPING)
    assert a is not None and b is not None
    topic = "factory/l/welder/w/telemetry"
    assert book.routed(topic, [a]) != book.routed(topic, [b])


# --- clearer first lines -------------------------------------------------------------------------


def test_mqtt5_refused_for_its_protocol_version_names_mqtt_protocol(fake: Any, caplog: Any) -> None:
    made = fake()
    with caplog.at_level(logging.ERROR, logger="gateway.source.mqtt"):
        made.client.fire_connect(rc=0x84)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "Unsupported protocol version" in line and "MQTT_PROTOCOL=3.1.1" in line


def test_a_connection_closed_before_connack_names_mqtt_protocol_only_on_mqtt5(fake: Any, caplog: Any) -> None:
    lines = {}
    for protocol in ("5", "3.1.1"):
        made = fake(config(protocol=protocol))
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="gateway.source.mqtt"):
            made.client.reconnect()
            made.client.fire_disconnect()
        (lines[protocol],) = [r.getMessage() for r in caplog.records]
    assert "MQTT_PROTOCOL=3.1.1" in lines["5"] and "MQTT_TLS" in lines["5"]
    assert "MQTT_PROTOCOL" not in lines["3.1.1"] and "MQTT_TLS" in lines["3.1.1"]


def test_a_session_gone_on_reconnect_is_a_warning_and_counted(fake: Any, caplog: Any) -> None:
    made = fake()
    made.client.fire_connect()
    made.client.fire_disconnect()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.source.mqtt"):
        made.client.fire_connect(session_present=False)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "session lost" in warnings[0].getMessage()
    assert made.source.stats()["session_lost"] == 1


# --- shared subscriptions told the truth ---------------------------------------------------------


def test_share_group_on_a_broker_without_shared_subscriptions_is_one_error_and_not_ready(
        fake: Any, caplog: Any) -> None:
    made = fake(config(share_group="g"), subscriptions=[("factory/#", 1)])
    with caplog.at_level(logging.ERROR, logger="gateway.source.mqtt"):
        made.client.fire_connect(SharedSubscriptionAvailable=0)
        made.source.step()
        made.source.update_subscriptions([("factory/#", 1), ("other/#", 1)])
        made.source.step()
        made.client.fire_connect(SharedSubscriptionAvailable=0)    # a reconnect says it again: no second line
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "MQTT_SHARE_GROUP" in lines[0] and "SharedSubscriptionAvailable=0" in lines[0]
    assert made.client.sent("subscribe") == [] and made.client.sent("disconnect") == []
    assert made.source.connected and not made.source.subscriptions_granted
    assert made.source.wait_subscribed(0) is False


def test_share_group_is_subscribed_where_the_broker_shares(fake: Any) -> None:
    made = fake(config(share_group="g"), subscriptions=[("factory/#", 1)])
    made.client.fire_connect(SharedSubscriptionAvailable=1)
    _granted(made)
    assert [r for _, _, r in made.client.sent("subscribe")] == [[("$share/g/factory/#", 1)]]
    assert made.source.subscriptions_granted


def test_share_group_on_mqtt311_warns_at_start_up_that_the_broker_cannot_be_asked(fake: Any, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.source.mqtt"):
        fake(config(share_group="g", protocol="3.1.1"))
        fake(config(share_group="g"))
        fake(config(protocol="3.1.1"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "MQTT_SHARE_GROUP" in lines[0] and "3.1.1" in lines[0]


# --- AWS IoT Core: ALPN on 443 -------------------------------------------------------------------


def test_alpn_protocols_are_offered_by_the_tls_context(fake: Any) -> None:
    import ssl

    made = fake(config(tls=True, tls_alpn=("x-amzn-mqtt-ca",), port=443))
    context = made.client.calls["tls_set_context"]
    assert isinstance(context, ssl.SSLContext) and "tls_set" not in made.client.calls
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_alpn_setting_is_a_list_and_implies_tls() -> None:
    from gateway.settings.settings import SettingsError, load_settings

    base = {"MQTT_HOST": "a.iot.eu-west-1.amazonaws.com", "GATEWAY_ROUTES": "r.yaml", "MQTT_PORT": "443"}
    mqtt = load_settings({**base, "MQTT_TLS_ALPN": "x-amzn-mqtt-ca, mqtt"}).mqtt
    assert mqtt.tls_alpn == ("x-amzn-mqtt-ca", "mqtt") and mqtt.tls and mqtt.port == 443
    try:
        load_settings({**base, "MQTT_TLS_ALPN": "x-amzn-mqtt-ca", "MQTT_TLS": "false"})
    except SettingsError as error:
        assert str(error).startswith("MQTT_TLS_ALPN:")
    else:
        raise AssertionError("ALPN without TLS was accepted")


def test_granting_many_filters_builds_the_copy_snapshot_once_not_once_per_suback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 routes are 10,000 SUBACKs: rebuilding per SUBACK was quadratic and wedged the loop."""
    import gateway.source.subscriptions as subscriptions
    built: list[int] = []
    real = subscriptions._Copies

    def counting(granted: Any) -> Any:
        built.append(len(granted))
        return real(granted)

    monkeypatch.setattr(subscriptions, "_Copies", counting)
    book = SubscriptionBook()
    book.set_desired([(f"bench/r{i}/+/welder/#", 0) for i in range(2000)] + [("bench/+/welder/#", 0)])
    book.new_connection(identifiers=True)
    subscribe, _ = book.plan()
    for mid, entry in enumerate(subscribe, start=1):
        book.sent(mid, [entry])
    for mid in range(1, len(subscribe) + 1):
        book.suback(mid, [(0, "Granted QoS 0")])
    assert built == []
    assert book.routed("bench/l1/welder/w7", [book.identifier("bench/+/welder/#") or 0])
    assert book.routed("bench/l1/welder/w7", [book.identifier("bench/+/welder/#") or 0])
    assert built == [2001]
