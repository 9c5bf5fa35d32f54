"""MQTT topic filters: syntax, a level trie built once per route table, and the minimal
subscription set.

The trie answers "which routes does this topic reach?" without scanning every filter, so a
table of 10,000 routes costs about what a table of one does. It also answers the two questions the
route file checks and the subscription set ask of filters: which filters *cover* a filter, and
which *overlap* it. Those are the only walks of the matching rules in the gateway, and all three
follow MQTT 3.1.1 §4.7 (and paho's ``topic_matches_sub``): ``+`` is exactly one level, ``#`` is the
rest including the parent level, and filters that start with a wildcard never match topics that
start with ``$``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["TopicTrie", "filter_error", "minimal_subscriptions", "topic_name_error"]

T = TypeVar("T")

_MAX_TOPIC_BYTES = 65535


def filter_error(topic_filter: str) -> str | None:
    """Why ``topic_filter`` is not a valid route filter, or None when it is."""
    if not isinstance(topic_filter, str) or topic_filter == "":
        return "a topic filter must be a non-empty string"
    if len(topic_filter.encode("utf-8", "surrogatepass")) > _MAX_TOPIC_BYTES:
        return "a topic filter is at most 65535 bytes"
    if "\x00" in topic_filter:
        return "a topic filter must not contain the null character"
    if topic_filter.startswith("$share/") or topic_filter == "$share":
        return (
            "'$share/' does not belong in a route filter: sharing is a process setting "
            "(MQTT_SHARE_GROUP) applied to every subscription"
        )
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level:
            if level != "#":
                return f"'#' must occupy a whole level (level {index + 1} is '{level}')"
            if index != len(levels) - 1:
                return "'#' is allowed only as the last level"
        if "+" in level and level != "+":
            return f"'+' must occupy a whole level (level {index + 1} is '{level}')"
    return None


def topic_name_error(topic: str) -> str | None:
    """Why ``topic`` cannot be the topic of a published message, or None when it can."""
    if not topic:
        return "a topic must not be empty"
    if "+" in topic or "#" in topic:
        return "a topic name has no '+' or '#' wildcards"
    if "\x00" in topic:
        return "a topic must not contain the null character"
    return None


class _Node:
    __slots__ = ("children", "hash_values", "plus", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.plus: _Node | None = None
        self.hash_values: list[int] = []
        self.values: list[int] = []


class TopicTrie(Generic[T]):
    """Immutable after construction: filters map to items. Every query returns items in the order
    they were given, each once, however many of its filters answer."""

    __slots__ = ("_items", "_root")

    def __init__(self, entries: Iterable[tuple[str, T]]) -> None:
        self._root = _Node()
        self._items: list[T] = []
        index_of: dict[int, int] = {}
        for topic_filter, item in entries:
            key = id(item)
            if key not in index_of:
                index_of[key] = len(self._items)
                self._items.append(item)
            self._insert(topic_filter, index_of[key])

    def _insert(self, topic_filter: str, index: int) -> None:
        node = self._root
        for level in topic_filter.split("/"):
            if level == "#":
                if index not in node.hash_values:
                    node.hash_values.append(index)
                return
            if level == "+":
                if node.plus is None:
                    node.plus = _Node()
                node = node.plus
            else:
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node()
                node = child
        if index not in node.values:
            node.values.append(index)

    def match(self, topic: str) -> tuple[T, ...]:
        """Items with a filter that matches the topic name ``topic``."""
        levels = topic.split("/")
        found: set[int] = set()
        dollar = topic.startswith("$")
        last = len(levels)
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if node.hash_values and not (dollar and i == 0):
                found.update(node.hash_values)
            if i == last:
                if node.values:
                    found.update(node.values)
                continue
            child = node.children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
            if node.plus is not None and not (dollar and i == 0):
                stack.append((node.plus, i + 1))
        return self._in_order(found)

    def covering(self, topic_filter: str) -> tuple[T, ...]:
        """Items with a filter that matches every topic ``topic_filter`` matches (itself included)."""
        levels = topic_filter.split("/")
        dollar = topic_filter.startswith("$")
        found: set[int] = set()
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if node.hash_values and not (dollar and i == 0):
                found.update(node.hash_values)
            if i == len(levels):
                found.update(node.values)
                continue
            level = levels[i]
            if level == "#":
                # Only a broad "#" (handled above) covers the rest of the levels, with one exception:
                # after a single empty first level ("/#"), "#" cannot stand for zero levels (the
                # topic "" is not valid), so "+/#" there covers it too.
                if i == 1 and levels[0] == "" and node.plus is not None and node.plus.hash_values:
                    found.update(node.plus.hash_values)
                continue
            if level != "+":  # a literal level is covered by the same literal or by "+"
                child = node.children.get(level)
                if child is not None:
                    stack.append((child, i + 1))
            if node.plus is not None and not (dollar and i == 0):
                stack.append((node.plus, i + 1))
        return self._in_order(found)

    def overlapping(self, topic_filter: str) -> tuple[T, ...]:
        """Items with a filter that shares at least one topic with ``topic_filter`` (itself included).

        Exact, not an estimate: ``#`` also matches its parent level, and a wildcard first level on
        either side never meets a first level that starts with ``$``.
        """
        levels = topic_filter.split("/")
        found: set[int] = set()
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            top = i == 0
            if i == len(levels):
                # The one topic shared here is the filter's own levels; the topic "" is not valid.
                if not (i == 1 and (levels[0] == "" or node is self._root.children.get(""))):
                    found.update(node.values)
                    found.update(node.hash_values)
                continue
            level = levels[i]
            dollar = top and level.startswith("$")
            if not dollar:
                found.update(node.hash_values)
            if level == "#":
                # "#" meeting a filter that ends here means the topic is these levels alone: not
                # when that is the topic "", which is not valid.
                empty_topic = i == 1 and (levels[0] == "" or node is self._root.children.get(""))
                _everything_below(node, found, top, skip_own_values=empty_topic)
                continue
            if level == "+":
                stack.extend((child, i + 1) for name, child in node.children.items()
                             if not (top and name.startswith("$")))
            else:
                child = node.children.get(level)
                if child is not None:
                    stack.append((child, i + 1))
            if node.plus is not None and not dollar:
                stack.append((node.plus, i + 1))
        return self._in_order(found)

    def _in_order(self, found: set[int]) -> tuple[T, ...]:
        if not found:
            return ()
        items = self._items
        return tuple(items[i] for i in sorted(found))


def _everything_below(start: _Node, found: set[int], top: bool, skip_own_values: bool = False) -> None:
    """Every filter at or below ``start``: what a ``#`` there can meet (not ``$`` first levels)."""
    stack = [(start, top)]
    while stack:
        node, at_top = stack.pop()
        found.update(node.hash_values)
        if not (skip_own_values and node is start):
            found.update(node.values)
        stack.extend((child, False) for name, child in node.children.items()
                     if not (at_top and name.startswith("$")))
        if node.plus is not None:
            stack.append((node.plus, False))


def minimal_subscriptions(filters: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """The fewest subscriptions that still deliver every topic of ``filters``.

    A filter covered by a broader one is dropped and the broader one is subscribed at the highest
    QoS of everything it covers (and of every filter it partly overlaps), so the broker never sends
    two copies of one message (Mosquitto 2.0 on MQTT 5 sends one per matching subscription; on 3.1.1
    one copy at the QoS of whichever matched first) and a QoS 1 route is never served by a QoS 0
    subscription. The gateway routes locally by topic, so nothing is lost by subscribing more
    broadly. See docs/delivery.md#overlapping-subscriptions.
    """
    best: dict[str, int] = {}
    for topic_filter, qos in filters:
        best[topic_filter] = max(qos, best.get(topic_filter, 0))
    names = sorted(best)
    trie: TopicTrie[str] = TopicTrie((name, name) for name in names)
    coverers = {name: set(trie.covering(name)) - {name} for name in names}
    # Two filters may cover each other (`/#` and `/+/#` match the same topics): of such a pair the
    # first in sort order is kept, so one of them is always subscribed.
    kept_set = {name for name in names
                if not any(name not in coverers[cover] or cover < name for cover in coverers[name])}
    kept = [name for name in names if name in kept_set]
    qos_of = dict(best)
    for name in names:
        for cover in coverers[name]:
            if cover in kept_set:
                qos_of[cover] = max(qos_of[cover], best[name])
    # Filters that still overlap in part (a/+/x and a/y/+) take the higher QoS of the two: on
    # MQTT 3.1.1 Mosquitto sends one copy at the QoS of whichever matched first.
    kept_trie = trie if len(kept) == len(names) else TopicTrie((name, name) for name in kept)
    raised = {name: max(qos_of[other] for other in (name, *kept_trie.overlapping(name))) for name in kept}
    return tuple((name, raised[name]) for name in kept)
