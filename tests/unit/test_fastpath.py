"""The shared-table PUBLISH properties decode every property set exactly as paho's own class."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.source import fastpath
from gateway.source.fastpath import SharedTableProperties

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)

publish_properties = st.fixed_dictionaries({}, optional={
    "PayloadFormatIndicator": st.integers(0, 1),
    "MessageExpiryInterval": st.integers(0, 2**32 - 1),
    "ContentType": text,
    "ResponseTopic": text.filter(bool),
    "CorrelationData": st.binary(max_size=20),
    "SubscriptionIdentifier": st.lists(st.integers(1, 268_435_455), min_size=1, max_size=3),
    "TopicAlias": st.integers(1, 65535),
    "UserProperty": st.lists(st.tuples(text, text), min_size=1, max_size=3),
})


def packed(values: dict[str, Any]) -> bytes:
    props = Properties(PacketTypes.PUBLISH)
    for name, value in values.items():
        setattr(props, name, value)
    return bytes(props.pack())


def publish_packet(props: bytes, payload: bytes = b'{"name": "device123"}') -> bytes:
    topic = b"factory/line1/welder/w7"
    return struct.pack("!H", len(topic)) + topic + struct.pack("!H", 7) + props + payload


@settings(max_examples=200, deadline=None)
@given(publish_properties)
def test_every_publish_property_set_decodes_as_paho_decodes_it(values: dict[str, Any]) -> None:
    buffer = packed(values) + b"payload"
    theirs, their_len = Properties(PacketTypes.PUBLISH).unpack(buffer)
    ours, our_len = SharedTableProperties(PacketTypes.PUBLISH).unpack(buffer)
    assert our_len == their_len
    assert ours.json() == theirs.json()
    assert str(ours) == str(theirs) and ours.isEmpty() == theirs.isEmpty()


def test_decoded_publish_is_the_same_with_and_without_the_change() -> None:
    packet = publish_packet(packed({"ContentType": "application/json", "UserProperty": [("a", "b")]}))
    empty = publish_packet(b"\x00")
    fastpath.install()
    try:
        ours = [_packet.decode_publish(0x32, p, MQTTProtocolVersion.MQTTv5) for p in (packet, empty)]
    finally:
        _packet.Properties = Properties  # type: ignore[attr-defined]
    theirs = [_packet.decode_publish(0x32, p, MQTTProtocolVersion.MQTTv5) for p in (packet, empty)]
    for a, b in zip(ours, theirs):
        assert (a.topic, a.mid, a.qos, a.payload) == (b.topic, b.mid, b.qos, b.payload)
        assert a.properties.json() == b.properties.json()
    assert isinstance(ours[1].properties, SharedTableProperties)


def test_instances_share_tables_but_not_values() -> None:
    a = SharedTableProperties(PacketTypes.PUBLISH)
    b = SharedTableProperties(PacketTypes.PUBLISH)
    a.ContentType = "text/plain"
    assert a.names is b.names and not hasattr(b, "ContentType")


def test_install_is_idempotent_and_leaves_an_unknown_paho_alone(monkeypatch: Any) -> None:
    monkeypatch.setattr(_packet, "Properties", Properties)
    assert fastpath.install() and fastpath.install()
    assert _packet.Properties is SharedTableProperties
    monkeypatch.setattr(_packet, "Properties", Properties)
    monkeypatch.setattr(fastpath.paho.mqtt, "__version__", "3.0.0")
    assert not fastpath.install()
    assert _packet.Properties is Properties


def test_a_truncated_property_section_fails_as_paho_fails() -> None:
    for cls in (Properties, SharedTableProperties):
        with pytest.raises(MalformedPacket):
            cls(PacketTypes.PUBLISH).unpack(b"")
