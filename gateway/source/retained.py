"""Which retained copies a broker sends *again*: the ones `retained: new_subscription` routes skip.

Why: the gateway subscribes on every connect (a resumed session may hold other filters than the
route file now wants), and a broker answers each SUBSCRIBE with the retained messages matching the
filter (MQTT 3.1.1 §3.8.4, and MQTT 5 with Retain Handling 0), whether or not the session already
had the subscription. Without telling those copies apart, every restart writes the retained
messages again (docs/route-file.md#retained-messages).

On MQTT 5 a filter subscribed with Retain Handling 1 leaves the decision to the broker, which
knows its session: whatever it sends then is for a new subscription. Where the broker cannot be
asked (MQTT 3.1.1, or an MQTT 5 filter asked with Retain Handling 0 because a route sharing its
topics wants `always`), the gateway decides from what it knows of the broker's session.

Invariant: a retained copy is called *resent* only when every subscription that can have brought
it is one the broker's session held before this connection subscribed it again, and was asked
with Retain Handling 0. The session is taken to hold, on a connection with session_present=True,
the filters granted on the previous connection of this process, or, on the first connection of
the process, every filter wanted then (a filter added to the route file while the gateway was
stopped is therefore taken as held: on MQTT 3.1.1 its retained messages are not written; MQTT 5
asks the broker instead). When in doubt (an identifier this connection does not know, no matching
subscription), a copy is not resent: the route writes it (a duplicate, never a skip by mistake).

Pure (no I/O, no paho); the subscription book drives it under its lock, and `resent()` reads one
immutable snapshot without a lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from gateway.routing.topics import TopicTrie

__all__ = ["ResendTracker"]


def _unshared(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class _Snapshot:
    __slots__ = ("_again", "_by_identifier", "_trie")

    def __init__(self, subscribed: Iterable[str], again: set[str], identifiers: Mapping[str, int]) -> None:
        subscribed = list(subscribed)
        self._again = again
        self._by_identifier = {identifiers[f]: f for f in subscribed if f in identifiers}
        self._trie: TopicTrie[str] = TopicTrie((_unshared(f), f) for f in subscribed)

    def resent(self, topic: str, identifiers: Sequence[int]) -> bool:
        if identifiers:
            by_identifier = self._by_identifier
            if any(i not in by_identifier for i in identifiers):
                return False
            candidates: Sequence[str] = [by_identifier[i] for i in identifiers]
        else:
            candidates = self._trie.match(topic)
        return bool(candidates) and all(f in self._again for f in candidates)


class ResendTracker:
    """What the broker's session held and how each filter was asked on this connection."""

    def __init__(self) -> None:
        self._first = True
        self._held: set[str] = set()       # in the broker's session before this connection
        self._asked: dict[str, int] = {}   # filter -> Retain Handling it was subscribed with here
        self._snapshot: _Snapshot | None = None

    def new_connection(self, session_present: bool, wanted: Iterable[str], granted: Iterable[str],
                       applied: Iterable[str]) -> None:
        """A CONNACK. `wanted`: the filters wanted now; `granted`/`applied`: what the previous
        connection had granted / asked for (the book passes them before it forgets them)."""
        if not session_present:
            held: set[str] = set()
        elif self._first:
            held = set(wanted)
        else:
            held = set(granted) | (self._held & set(applied))
        self._first = False
        self._held = held
        self._asked = {}
        self._snapshot = None

    def subscribed(self, filters: Iterable[str], handling: Mapping[str, int]) -> None:
        """SUBSCRIBE sent for `filters` with these Retain Handling values (0 on MQTT 3.1.1)."""
        for f in filters:
            self._asked[f] = handling.get(f, 0)

    def unsubscribed(self, filters: Iterable[str]) -> None:
        for f in filters:
            self._held.discard(f)
            self._asked.pop(f, None)

    def rebuild(self, identifiers: Mapping[str, int]) -> None:
        """Take a new snapshot for `resent()` (after the subscribes and unsubscribes of a plan)."""
        again = {f for f, handling in self._asked.items() if handling == 0 and f in self._held}
        self._snapshot = _Snapshot(self._asked, again, identifiers) if again else None

    def resent(self, topic: str, identifiers: Sequence[int] = ()) -> bool:
        """Whether a retained copy on `topic` (naming `identifiers`, MQTT 5) is one the broker
        sent again for a subscription its session already had. Lock-free."""
        snapshot = self._snapshot
        return snapshot is not None and snapshot.resent(topic, identifiers)
