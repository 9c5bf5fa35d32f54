"""paho's per-message work made cheaper: same properties, same messages, as paho's own code."""

from __future__ import annotations

import itertools
import socket
import struct
from typing import Any

import paho.mqtt.client as paho_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.source import fastpath
from gateway.source.fastpath import BufferedClient, SharedTableProperties
from gateway.source.packets import publish_properties as publish_properties_of

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


# --- buffered reads ---------------------------------------------------------------------------


def encode_publish(topic: bytes, payload: bytes, *, v5: bool, qos: int, mid: int) -> bytes:
    body = (struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
            + (b"\x00" if v5 else b"") + payload)
    length, remaining = bytearray(), len(body)
    while True:
        digit, remaining = remaining % 128, remaining // 128
        length.append(digit | (128 if remaining else 0))
        if not remaining:
            return bytes([0x30 | qos << 1]) + bytes(length) + body


class ChunkedSocket:
    """Hands out the stream in the given chunks; None is a moment with nothing to read."""

    def __init__(self, chunks: list[bytes | None]) -> None:
        self.chunks = list(chunks)

    def recv(self, size: int) -> bytes:
        chunk = self.chunks.pop(0) if self.chunks else None
        if chunk is None:
            raise BlockingIOError
        if len(chunk) > size:
            self.chunks.insert(0, chunk[size:])
        return chunk[:size]

    def close(self) -> None:
        pass


def received(client_class: type, chunks: list[bytes | None], v5: bool) -> list[tuple[Any, ...]]:
    protocol = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    client = client_class(CallbackAPIVersion.VERSION2, protocol=protocol, manual_ack=True)
    got: list[tuple[Any, ...]] = []
    client.on_message = lambda _c, _u, m: got.append((m.topic, m.payload, m.qos, m.mid))
    client._sock = ChunkedSocket(chunks)
    while client._sock.chunks or getattr(client, "buffered", lambda: 0)():
        client.loop_read()
    return got


packets = st.lists(st.tuples(st.sampled_from([b"t", b"factory/line1/welder/w7"]),
                             st.one_of(st.binary(max_size=300), st.integers(16_000, 20_000).map(b"p".__mul__)),
                             st.integers(0, 1)), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(packets, st.booleans(), st.lists(st.integers(1, 4000), min_size=1, max_size=20), st.booleans())
def test_buffered_reads_deliver_what_paho_delivers(messages: list[tuple[bytes, bytes, int]], v5: bool,
                                                   cuts: list[int], stalls: bool) -> None:
    stream = b"".join(encode_publish(t, p, v5=v5, qos=q, mid=i + 1) for i, (t, p, q) in enumerate(messages))
    chunks: list[bytes | None] = []
    pos = 0
    for i in itertools.cycle(range(len(cuts))):
        if pos >= len(stream):
            break
        chunks.append(stream[pos:pos + cuts[i]])
        pos += cuts[i]
        if stalls:
            chunks.append(None)
    assert received(BufferedClient, chunks, v5) == received(paho_client.Client, chunks, v5)


def test_bytes_buffered_for_an_old_connection_are_dropped_on_a_new_one() -> None:
    client = BufferedClient(CallbackAPIVersion.VERSION2, manual_ack=True)
    two = encode_publish(b"t", b"1", v5=True, qos=0, mid=0) * 2
    client._sock = ChunkedSocket([two])
    client.loop_read()
    assert client.buffered() == len(two) // 2
    client._sock = ChunkedSocket([])
    assert client.buffered() == 0


class ShortReadSocket(socket.socket):
    """A plain TCP socket as the client sees it, handing out the given chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.chunks = list(chunks)

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.chunks:
            raise BlockingIOError
        return self.chunks.pop(0)[:size]


def test_drained_once_a_short_read_of_plain_tcp_is_parsed_and_never_on_other_sockets() -> None:
    client = BufferedClient(CallbackAPIVersion.VERSION2, manual_ack=True)
    one = encode_publish(b"t", b"1", v5=True, qos=0, mid=0)
    filling = next(p for n in range(65_400, 65_536)
                   if len(p := encode_publish(b"t", b"x" * n, v5=True, qos=0, mid=0)) == BufferedClient.READ_SIZE)
    with ShortReadSocket([one * 2]) as sock:
        client._sock = sock
        client.loop_read()
        assert (client.buffered(), client.drained()) == (len(one), False)   # a message left to parse
        client.loop_read()
        assert (client.buffered(), client.drained()) == (0, True)
    with ShortReadSocket([filling]) as sock:
        client._sock = sock
        client.loop_read()
        assert (client.buffered(), client.drained()) == (0, False)   # the read filled its buffer: more may wait
    client._sock = ChunkedSocket([one])        # TLS or WebSockets: a short read says nothing
    client.loop_read()
    assert (client.buffered(), client.drained()) == (0, False)


@pytest.mark.parametrize("cls", [Properties, fastpath.SharedTableProperties])
def test_publish_properties_reads_what_the_packet_carries_and_nothing_from_an_empty_set(cls: type) -> None:
    empty = cls(PacketTypes.PUBLISH)
    assert publish_properties_of(empty) == ((), None, None)
    full = cls(PacketTypes.PUBLISH)
    full.UserProperty = ("a", "1")
    full.UserProperty = ("b", "2")
    full.ContentType = "application/json"
    full.SubscriptionIdentifier = 7
    assert publish_properties_of(full) == ((("a", "1"), ("b", "2")), "application/json", [7])
    assert publish_properties_of(None) == ((), None, None)
