"""Two changes to paho's per-message work, identical in result: shared property tables and
buffered reads.

Why the first: on MQTT 5, paho builds a new `Properties` for every incoming PUBLISH, and its constructor
re-derives the same three lookup tables each time (27 names, 27 `list.index` calls), then
`unpack` walks all 27 names again to clear attributes the fresh object cannot have. Measured here
(timeit, the welder payload): 11 µs to decode one PUBLISH with paho's class, 2.4 µs with shared
tables, where bare paho spends about 24 µs of CPU per message in a burst. Devices rarely send
PUBLISH properties at all.

What changes: the PUBLISH decoder (`paho.mqtt._packet`) gets a subclass whose instances share
one copy of those tables (paho never mutates them) and which returns at once when the property
section is empty. Every attribute, method and error is paho's own; a property test checks that
the subclass decodes every property set exactly as paho does. The change is made only when paho
looks the way it was checked against (2.x, with the decoder importing `Properties` by name);
otherwise paho is left alone, which is slower but correct.

Why the second: paho reads each packet with three `recv` calls (1 byte of type, the length byte
by byte, then the rest). Each is a system call that releases and retakes the GIL, and with the
sink's threads busy, retaking it can wait a whole switch interval. `BufferedClient` reads up to
64 KiB at once and serves paho's small reads from that buffer; paho's packet parser is unchanged.
It also says when the socket is known to be drained (`drained()`): on plain TCP a read that got
less than it asked for took everything the kernel held, so once that is parsed, one more read
would only find nothing. The network loop then ends its round without that read: with a broker
that sends one message per PUBACK, every message is a round of its own.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

import paho.mqtt
from paho.mqtt import _packet
from paho.mqtt.client import Client as PahoClient
from paho.mqtt.properties import Properties

__all__ = ["BufferedClient", "SharedTableProperties", "install"]

log = logging.getLogger("gateway.source.mqtt")

_TEMPLATE = Properties(1)   # any packet type: the tables do not depend on it
_TABLES = {"types": _TEMPLATE.types, "names": _TEMPLATE.names, "properties": _TEMPLATE.properties}


class SharedTableProperties(Properties):
    """paho's Properties with its lookup tables built once instead of once per packet."""

    def __init__(self, packetType: int) -> None:  # noqa: N803 - paho's parameter name
        object.__setattr__(self, "packetType", packetType)
        for name, table in _TABLES.items():
            object.__setattr__(self, name, table)

    def unpack(self, buffer: Any) -> tuple[Properties, int]:
        if buffer[:1] == b"\x00":   # property length 0: a fresh object has nothing to clear or read
            return self, 1
        return super().unpack(buffer)


def install() -> bool:
    """Give paho's packet decoder the shared-table Properties; True if it is in use."""
    if getattr(_packet, "Properties", None) is SharedTableProperties:
        return True
    if not paho.mqtt.__version__.startswith("2.") or getattr(_packet, "Properties", None) is not Properties:
        log.info("paho-mqtt %s: PUBLISH properties decoded by paho's own code", paho.mqtt.__version__)
        return False
    _packet.Properties = SharedTableProperties  # type: ignore[attr-defined]
    return True


class BufferedClient(PahoClient):
    """paho's client, reading the socket in large chunks; `buffered()` says what is left to parse.

    A caller that selects on `socket()` must also run `loop_read` while `buffered()` is
    non-zero: those bytes have already left the socket.
    """

    READ_SIZE = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_sock: Any = None
        self._read_buf = b""
        self._read_pos = 0
        self._read_plain = False    # the connection is plain TCP (not TLS, not WebSockets)
        self._read_short = False    # ...and its last read got less than it asked for

    def buffered(self) -> int:
        if self._read_sock is not self._sock:
            return 0
        return len(self._read_buf) - self._read_pos

    def drained(self) -> bool:
        """True when all that was read is parsed and the last read was short on plain TCP: the
        socket held nothing more then. Never True on TLS or WebSockets, whose reads stop at a
        record or frame."""
        return self._read_short and self._read_sock is self._sock and self._read_pos >= len(self._read_buf)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._read_sock is not self._sock:   # a new connection: nothing read belongs to it
            self._read_sock, self._read_buf, self._read_pos = self._sock, b"", 0
            self._read_plain = isinstance(self._sock, socket.socket) and not isinstance(self._sock, ssl.SSLSocket)
        buf, pos = self._read_buf, self._read_pos
        if pos >= len(buf):
            self._read_short = False
            asked = max(bufsize, self.READ_SIZE)
            buf = super()._sock_recv(asked)   # raises as paho expects
            if not buf:
                return buf      # end of stream: paho closes the connection
            self._read_buf, pos = buf, 0
            self._read_short = self._read_plain and len(buf) < asked
        end = pos + bufsize
        self._read_pos = end
        return buf[pos:end] if pos or end < len(buf) else buf
