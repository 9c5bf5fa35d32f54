"""One change to paho's per-PUBLISH work, made once per process, identical in result.

Why: on MQTT 5, paho builds a new `Properties` for every incoming PUBLISH, and its constructor
re-derives the same three lookup tables each time (27 names, 27 `list.index` calls), then
`unpack` walks all 27 names again to clear attributes the fresh object cannot have. That is about
a third of paho's time per message, spent before our code sees the message. Devices rarely send
PUBLISH properties at all.

What changes: the PUBLISH decoder (`paho.mqtt._packet`) gets a subclass whose instances share
one copy of those tables (paho never mutates them) and which returns at once when the property
section is empty. Every attribute, method and error is paho's own; a property test checks that
the subclass decodes every property set exactly as paho does. The change is made only when paho
looks the way it was checked against (2.x, with the decoder importing `Properties` by name);
otherwise paho is left alone, which is slower but correct.
"""

from __future__ import annotations

import logging
from typing import Any

import paho.mqtt
from paho.mqtt import _packet
from paho.mqtt.properties import Properties

__all__ = ["SharedTableProperties", "install"]

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
