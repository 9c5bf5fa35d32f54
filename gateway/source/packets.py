"""The MQTT 5 details of the packets the session sends and reads: SUBSCRIBE options and properties,
PUBLISH properties. Kept apart so the session reads as what each packet means, not how paho
spells it; nothing here keeps state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

__all__ = ["identified", "publish_properties", "v5_request"]


_NO_PROPERTIES = frozenset({"packetType", "types", "names", "properties"})   # what paho keeps besides properties


def publish_properties(properties: Any) -> tuple[tuple[tuple[str, str], ...], str | None, Any]:
    """(user properties, content type, subscription identifiers) of a PUBLISH: MQTT 5 only (paho
    gives None on 3.1.1), and paho sets an attribute only for a property the packet carries. Most
    PUBLISHes carry none, which one look at the instance's attributes tells."""
    if properties is None:
        return (), None, None
    attributes = getattr(properties, "__dict__", None)
    if attributes is not None and attributes.keys() <= _NO_PROPERTIES:
        return (), None, None
    user_properties = getattr(properties, "UserProperty", None)
    return ((tuple(user_properties) if user_properties else ()), getattr(properties, "ContentType", None),
            getattr(properties, "SubscriptionIdentifier", None))


def v5_request(subscribe: list[tuple[str, int]], no_local: bool,
               retain_handling: Callable[[str], int] = lambda _: 1) -> list[Any]:
    """MQTT 5 subscribe options: each filter's Retain Handling (by default 1, so a resubscription
    on every reconnect does not resend retained messages; the route table decides it,
    docs/route-file.md#retained-messages); Retain As Published stays 0, so a live message arrives
    with retain=0 and only a copy sent on subscribing has the flag; no-local (our own dead letters
    never come back to us), except on a shared subscription, where MQTT 5 forbids it."""
    return [(f, SubscribeOptions(qos=q, noLocal=no_local, retainAsPublished=False, retainHandling=retain_handling(f)))
            for f, q in subscribe]


def identified(identifier: int) -> Any:
    """SUBSCRIBE properties carrying one subscription identifier (it applies to the whole packet)."""
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = identifier
    return props
