"""MQTT topic filters: syntax, a level trie built once per route table, and the minimal
subscription set.

The trie answers "which routes does this topic reach?" without scanning every filter, so a
table of 10,000 routes costs about what a table of one does. Matching follows MQTT 3.1.1 §4.7
(and paho's ``topic_matches_sub``): ``+`` is exactly one level, ``#`` is the rest including the
parent level, and filters that start with a wildcard never match topics that start with ``$``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

__all__ = ["filter_error", "topic_name_error", "covers", "TopicTrie", "minimal_subscriptions"]

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


def _matches_dollar_rule(filter_levels: Sequence[str], topic_levels: Sequence[str]) -> bool:
    return not (topic_levels and topic_levels[0].startswith("$") and filter_levels[0] in ("+", "#"))


def covers(broad: str, narrow: str) -> bool:
    """True when every topic that ``narrow`` matches is also matched by ``broad``."""
    b, n = broad.split("/"), narrow.split("/")
    if n[0].startswith("$") and b[0] in ("+", "#"):
        return False
    for i, level in enumerate(b):
        if level == "#":
            return True
        if i >= len(n):
            return False
        if n[i] == "#":
            return False
        if level != "+" and level != n[i]:
            return False
        if level == "+" and n[i] == "#":
            return False
    if len(n) == len(b):
        return True
    # broad is exhausted; narrow has more levels: only a trailing "#" in broad would cover them.
    return False


class _Node:
    __slots__ = ("children", "plus", "hash_values", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.plus: _Node | None = None
        self.hash_values: list[int] = []
        self.values: list[int] = []


class TopicTrie(Generic[T]):
    """Immutable after construction: filters map to items, ``match`` returns items in the order
    they were given, each once, however many of its filters match."""

    __slots__ = ("_root", "_items")

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
                node = node.children.setdefault(level, _Node())
        if index not in node.values:
            node.values.append(index)

    @property
    def root(self) -> _Node:
        return self._root

    def item(self, index: int) -> T:
        return self._items[index]

    def match(self, topic: str) -> tuple[T, ...]:
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
        if not found:
            return ()
        items = self._items
        return tuple(items[i] for i in sorted(found))


def _coverers(root: _Node, narrow: str) -> set[int]:
    """Indices of the filters in ``root`` that cover ``narrow`` (a walk, not a scan)."""
    levels = narrow.split("/")
    dollar = narrow.startswith("$")
    found: set[int] = set()
    stack: list[tuple[_Node, int]] = [(root, 0)]
    while stack:
        node, i = stack.pop()
        if node.hash_values and not (dollar and i == 0):
            found.update(node.hash_values)
        if i == len(levels):
            found.update(node.values)
            continue
        level = levels[i]
        if level == "#":
            continue  # only a broad "#" (handled above) covers the rest of the levels
        if level != "+":  # a literal level is covered by the same literal or by "+"
            child = node.children.get(level)
            if child is not None:
                stack.append((child, i + 1))
        if node.plus is not None and not (dollar and i == 0):
            stack.append((node.plus, i + 1))
    return found


def _subtree(node: _Node, found: set[int]) -> None:
    stack = [node]
    while stack:
        current = stack.pop()
        found.update(current.values)
        found.update(current.hash_values)
        stack.extend(current.children.values())
        if current.plus is not None:
            stack.append(current.plus)


def _intersecting(root: _Node, topic_filter: str) -> set[int]:
    """Indices of the filters in ``root`` that share at least one topic with ``topic_filter``."""
    levels = topic_filter.split("/")
    dollar = levels[0].startswith("$")
    found: set[int] = set()
    stack: list[tuple[_Node, int]] = [(root, 0)]
    while stack:
        node, i = stack.pop()
        wild_ok = not (dollar and i == 0)
        if node.hash_values and (wild_ok or levels[0] in ("+", "#")):
            found.update(node.hash_values)
        if i == len(levels):
            found.update(node.values)
            continue
        level = levels[i]
        if level == "#":
            _subtree(node, found)  # "#" also matches the parent level: every filter from here on
            continue
        if level == "+":
            for child in node.children.values():
                stack.append((child, i + 1))
        else:
            child = node.children.get(level)
            if child is not None:
                stack.append((child, i + 1))
        if node.plus is not None and (wild_ok or level == "+"):
            stack.append((node.plus, i + 1))
    return found


def minimal_subscriptions(filters: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """The fewest subscriptions that still deliver every topic of ``filters``.

    A filter covered by a broader one is dropped and the broader one is subscribed at the highest
    QoS of everything it covers (and of every filter it partly overlaps), so the broker never sends two copies of one message (Mosquitto
    2.0 on MQTT 5 sends one per matching subscription; on 3.1.1 one copy at the QoS of whichever
    matched first) and a QoS 1 route is never served by a QoS 0 subscription. The gateway routes
    locally by topic, so nothing is lost by subscribing more broadly.
    """
    best: dict[str, int] = {}
    for topic_filter, qos in filters:
        best[topic_filter] = max(qos, best.get(topic_filter, 0))
    names = sorted(best)
    trie: TopicTrie[str] = TopicTrie((name, name) for name in names)
    coverers = {name: {trie.item(i) for i in _coverers(trie.root, name)} - {name} for name in names}
    kept = [name for name in names if not coverers[name]]
    qos_of = dict(best)
    for name in names:
        for cover in coverers[name]:
            if not coverers[cover]:
                qos_of[cover] = max(qos_of[cover], best[name])
    # Filters that still overlap in part (a/+/x and a/y/+) take the higher QoS of the two: on
    # MQTT 3.1.1 Mosquitto sends one copy at the QoS of whichever matched first.
    kept_trie: TopicTrie[str] = TopicTrie((name, name) for name in kept)
    raised = {name: max(qos_of[kept_trie.item(i)] for i in _intersecting(kept_trie.root, name)) for name in kept}
    return tuple((name, raised[name]) for name in kept)
