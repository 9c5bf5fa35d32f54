"""Bookkeeping of MQTT subscriptions: wanted set, what this connection asked for, what was granted.

Pure (no I/O, no paho): the MQTT source asks it what to (un)subscribe and tells it what SUBACK
said. Why its own module: the hot reload changes subscriptions on a live connection, and a refused
subscription must be reported, never silently ignored (docs/route-file.md#hot-reload); that
logic deserves tests that need no broker.

A refused subscription is a SUBACK reason code >= 0x80, or a granted QoS lower than asked (a QoS 1
route served at QoS 0 would lose the at-least-once promise without any error).

It also owns the MQTT 5 subscription identifiers (docs/delivery.md#overlapping-subscriptions). Two
partly overlapping filters make a broker send one copy of a message per matching subscription
(or one copy naming every identifier). The invariant: of the copies of one message, exactly one
is routed: the one whose identifiers name the *canonical* subscription for its topic, the matching
subscription granted first on this connection. Every granted subscription that matches delivers
its identifier (the MQTT 5 rule), so the canonical copy always arrives. A copy naming an
identifier this connection has not granted (a session resumed before its SUBACKs, a filter being
removed) is routed too: a duplicate is possible in those moments, a loss never. Identifiers are a
stable function of the filter, so the ones a resumed session carries from the last run mean the
same filter now.

And the MQTT 5 Retain Handling of each filter (the route table decides it), with what the
broker's session held, so that a retained copy sent again for a subscription the session already
had can be told apart (gateway/source/retained.py).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gateway.routing.topics import TopicTrie
from gateway.source.retained import ResendTracker

__all__ = ["SubackResult", "SubscriptionBook", "share_prefixed", "subscription_identifiers"]


_MAX_IDENTIFIER = 268_435_455   # MQTT 5: a Subscription Identifier is 1..268,435,455


def subscription_identifiers(filters: Iterable[str]) -> dict[str, int]:
    """filter -> its MQTT 5 Subscription Identifier, for the filters that share a topic with
    another (only those can bring a message twice). A hash of the filter, so the same filter keeps
    its identifier across restarts; a collision takes the next free value (in sorted filter order)."""
    names = sorted(set(filters))
    trie: TopicTrie[str] = TopicTrie((_unshared(f), f) for f in names)
    ids: dict[str, int] = {}
    used: set[int] = set()
    for topic_filter in names:
        if len(trie.overlapping(_unshared(topic_filter))) < 2:
            continue
        identifier = zlib.crc32(topic_filter.encode("utf-8", "surrogatepass")) % _MAX_IDENTIFIER + 1
        while identifier in used:
            identifier = identifier % _MAX_IDENTIFIER + 1
        used.add(identifier)
        ids[topic_filter] = identifier
    return ids


def _unshared(topic_filter: str) -> str:
    """The filter a `$share/<group>/<filter>` subscription matches topics with."""
    if topic_filter.startswith("$share/"):
        return topic_filter.split("/", 2)[2]
    return topic_filter


class _Copies:
    """The granted identified subscriptions, for choosing the one copy of a message to route."""

    __slots__ = ("_order", "_trie")

    def __init__(self, granted: Sequence[tuple[str, int]]) -> None:
        self._order = {identifier: position for position, (_, identifier) in enumerate(granted)}
        self._trie: TopicTrie[int] = TopicTrie((_unshared(f), identifier) for f, identifier in granted)

    def routed(self, topic: str, identifiers: Sequence[int]) -> bool:
        order = self._order
        if any(i not in order for i in identifiers):
            return True
        matching = self._trie.match(topic)
        if not matching:
            return True
        canonical = min(matching, key=order.__getitem__)
        return canonical in identifiers


def share_prefixed(topic_filter: str, share_group: str | None) -> str:
    """`$share/<group>/<filter>` when a share group is set, else the filter itself."""
    return f"$share/{share_group}/{topic_filter}" if share_group else topic_filter


@dataclass(frozen=True, slots=True)
class SubackResult:
    """What one SUBACK entry meant for one filter (`granted_qos` is None when refused)."""

    topic_filter: str
    requested_qos: int
    granted_qos: int | None
    reason: str

    @property
    def refused(self) -> bool:
        return self.granted_qos is None or self.granted_qos < self.requested_qos


class SubscriptionBook:
    """Wanted filters vs. this connection's requests and grants. Thread-safe (one small lock)."""

    def __init__(self, share_group: str | None = None) -> None:
        self._share_group = share_group or None
        self._lock = threading.Lock()
        self._desired: dict[str, int] = {}        # full filter (with $share prefix) -> qos
        self._applied: dict[str, int] = {}        # asked for on this connection
        self._pending: dict[int, list[tuple[str, int]]] = {}   # SUBSCRIBE mid -> what it asked
        self._granted: dict[str, int] = {}
        self._refused: dict[str, str] = {}
        self._dirty = False
        self._identified = False                  # this connection subscribes with identifiers
        self._identifiers: dict[str, int] = {}    # full filter -> identifier
        self._grant_order: dict[str, int] = {}    # granted with an identifier, first granted first
        self._copies: _Copies | None = None
        self._copies_stale = False                # grants changed since `_copies` was built
        self._handling: dict[str, int] = {}       # full filter -> MQTT 5 Retain Handling
        self._asks_handling = False               # this connection is MQTT 5: the broker is asked
        self._resends = ResendTracker()

    def set_desired(self, subscriptions: Iterable[tuple[str, int]],
                    retain_handling: Mapping[str, int] | None = None) -> None:
        """Replace the wanted set (filters without the share prefix; QoS 0..2). `retain_handling`:
        filter -> MQTT 5 Retain Handling (0 send, 1 only for a new subscription, 2 never);
        1 for a filter it does not name."""
        handling = {share_prefixed(f, self._share_group): h for f, h in (retain_handling or {}).items()}
        desired: dict[str, int] = {}
        for topic_filter, qos in subscriptions:
            if qos not in (0, 1, 2):
                raise ValueError(f"subscription {topic_filter!r}: qos must be 0, 1 or 2, got {qos!r}")
            full = share_prefixed(topic_filter, self._share_group)
            desired[full] = max(qos, desired.get(full, 0))
        identifiers = subscription_identifiers(desired)
        with self._lock:
            self._desired = desired
            self._identifiers = identifiers
            self._handling = {f: handling.get(f, 1) for f in desired}
            self._dirty = True
            self._grants_changed(list(self._granted))   # filters granted before they had an identifier

    def retain_handling(self, topic_filter: str) -> int:
        """The Retain Handling to subscribe `topic_filter` (full, as `plan()` gives it) with."""
        return self._handling.get(topic_filter, 1)

    def resent(self, topic: str, identifiers: Sequence[int] = ()) -> bool:
        """Whether a retained copy on `topic` is one the broker sent again for a subscription its
        session already had (gateway/source/retained.py). Lock-free."""
        return self._resends.resent(topic, identifiers)

    @property
    def desired(self) -> dict[str, int]:
        with self._lock:
            return dict(self._desired)

    @property
    def dirty(self) -> bool:
        """The wanted set changed since the last `plan()` on this connection."""
        return self._dirty

    def new_connection(self, identifiers: bool = False, *, session_present: bool = False,
                       retain_handling: bool = False) -> None:
        """A fresh CONNACK: nothing is asked or granted on it yet, so everything is re-subscribed.
        `identifiers`: the connection is MQTT 5 and the broker takes subscription identifiers;
        `retain_handling`: it is MQTT 5, so each SUBSCRIBE carries its filter's Retain Handling."""
        with self._lock:
            self._resends.new_connection(session_present, self._desired, self._granted, self._applied)
            self._asks_handling = retain_handling
            self._applied.clear()
            self._pending.clear()
            self._granted.clear()
            self._refused.clear()
            self._grant_order.clear()
            self._copies = None
            self._copies_stale = False
            self._identified = identifiers
            self._dirty = True

    def identifier(self, topic_filter: str) -> int | None:
        """The identifier to subscribe `topic_filter` (full, as `plan()` gives it) with, or None
        when this connection does not use identifiers."""
        if not self._identified:
            return None
        return self._identifiers.get(topic_filter)

    def routed(self, topic: str, identifiers: Sequence[int]) -> bool:
        """Whether this copy of a message on `topic`, which named `identifiers`, is the one to
        route (see the module's invariant). Reads one snapshot, rebuilt here once after grants
        changed: a SUBACK only marks it stale, so subscribing N filters costs O(N), not O(N²)."""
        if self._copies_stale:
            self._rebuild_copies()
        copies = self._copies
        return copies is None or not identifiers or copies.routed(topic, identifiers)

    def plan(self) -> tuple[list[tuple[str, int]], list[str]]:
        """What to send now: (subscribe new or QoS-changed filters, unsubscribe removed ones).

        The caller must send both; they are recorded as asked for at once.
        """
        with self._lock:
            self._dirty = False
            subscribe = [(f, q) for f, q in self._desired.items() if self._applied.get(f) != q]
            unsubscribe = [f for f in self._applied if f not in self._desired]
            for f in unsubscribe:
                del self._applied[f]
                self._granted.pop(f, None)
                self._refused.pop(f, None)
            for f, q in subscribe:
                self._applied[f] = q
                self._granted.pop(f, None)
                self._refused.pop(f, None)
            self._resends.unsubscribed(unsubscribe)
            self._resends.subscribed((f for f, _ in subscribe), self._handling if self._asks_handling else {})
            self._resends.rebuild(self._identifiers if self._identified else {})
            self._grants_changed(unsubscribe + [f for f, _ in subscribe])
            return subscribe, unsubscribe

    def sent(self, mid: int, subscribe: Sequence[tuple[str, int]]) -> None:
        """The SUBSCRIBE for `subscribe` went out with packet id `mid`."""
        with self._lock:
            self._pending[mid] = list(subscribe)

    def send_failed(self, subscribe: Sequence[tuple[str, int]], reason: str) -> list[SubackResult]:
        """The SUBSCRIBE could not even be queued (e.g. a filter paho rejects): refused."""
        return self._record([(f, q, None, reason) for f, q in subscribe])

    def suback(self, mid: int, codes: Sequence[tuple[int, str]]) -> list[SubackResult]:
        """Apply one SUBACK: `codes` are (reason code value, reason name) in request order.

        Returns one result per filter still wanted at that QoS (superseded requests are ignored).
        """
        with self._lock:
            asked = self._pending.pop(mid, None)
        if asked is None:
            return []
        entries: list[tuple[str, int, int | None, str]] = []
        for i, (f, q) in enumerate(asked):
            if i >= len(codes):
                entries.append((f, q, None, "no reason code in SUBACK"))
                continue
            value, name = codes[i]
            if value >= 0x80:
                entries.append((f, q, None, name))
            elif value < q:
                entries.append((f, q, value, f"granted QoS {value} lower than requested QoS {q}"))
            else:
                entries.append((f, q, value, name))
        return self._record(entries)

    def _record(self, entries: list[tuple[str, int, int | None, str]]) -> list[SubackResult]:
        results = []
        changed = []
        with self._lock:
            for f, q, granted, reason in entries:
                if self._applied.get(f) != q:
                    continue          # superseded by a later change or a new connection
                result = SubackResult(f, q, granted, reason)
                if result.refused:
                    self._refused[f] = reason
                    self._granted.pop(f, None)
                else:
                    self._granted[f] = granted if granted is not None else q
                    self._refused.pop(f, None)
                results.append(result)
                changed.append(f)
            self._grants_changed(changed)
        return results

    def _grants_changed(self, filters: Iterable[str]) -> None:
        """Keep the grant order for `filters`, whose grants changed (lock held): first granted stays
        first. The copy-choosing snapshot is only marked stale; `routed` rebuilds it."""
        order = self._grant_order
        for f in filters:
            if f not in self._granted:
                order.pop(f, None)
            elif self._identified and f not in order and f in self._identifiers:
                order[f] = self._identifiers[f]
        self._copies_stale = True

    def _rebuild_copies(self) -> None:
        with self._lock:
            if not self._copies_stale:
                return
            order = self._grant_order
            self._copies = _Copies(list(order.items())) if len(order) > 1 else None
            self._copies_stale = False

    @property
    def awaiting_suback(self) -> bool:
        """A SUBSCRIBE of this connection is not answered yet."""
        return bool(self._pending)

    @property
    def all_granted(self) -> bool:
        """Every wanted filter is granted at (at least) its QoS on this connection."""
        with self._lock:
            return all(self._granted.get(f, -1) >= q for f, q in self._desired.items())

    @property
    def refused(self) -> dict[str, str]:
        with self._lock:
            return dict(self._refused)

    def status(self) -> dict[str, str]:
        """filter -> "granted qos N" | "pending" | "refused: <reason>" for every wanted filter."""
        with self._lock:
            out = {}
            for f, q in self._desired.items():
                if f in self._refused:
                    out[f] = f"refused: {self._refused[f]}"
                elif self._granted.get(f, -1) >= q:
                    out[f] = f"granted qos {self._granted[f]}"
                else:
                    out[f] = "pending"
            return out
