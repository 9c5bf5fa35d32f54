"""Topic matching agrees with paho-mqtt, and the minimal subscription set loses no topic."""

from __future__ import annotations

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from gateway.routing.topics import TopicTrie, filter_error, minimal_subscriptions

LEVELS = st.sampled_from(["a", "b", "c", "$SYS", "", "x y", "ü"])
TOPICS = st.lists(LEVELS, min_size=1, max_size=5).map("/".join).filter(bool)  # "" is not a valid topic name
FILTER_LEVELS = st.sampled_from(["a", "b", "c", "$SYS", "", "+"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(FILTER_LEVELS, min_size=1, max_size=5))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@pytest.mark.parametrize(
    ("topic_filter", "problem"),
    [
        ("a/#/b", "last level"),
        ("a/b#", "whole level"),
        ("a/+b", "whole level"),
        ("", "non-empty"),
        ("$share/group/a", "MQTT_SHARE_GROUP"),
    ],
)
def test_invalid_filters_are_explained(topic_filter: str, problem: str) -> None:
    message = filter_error(topic_filter)
    assert message is not None and problem in message


@pytest.mark.parametrize("topic_filter", ["#", "+", "a/+/b/#", "/", "a//b", "$SYS/#", "+/+"])
def test_valid_filters_pass(topic_filter: str) -> None:
    assert filter_error(topic_filter) is None


@settings(max_examples=400, deadline=None)
@given(st.lists(filters(), min_size=1, max_size=6, unique=True), TOPICS)
def test_trie_agrees_with_paho_topic_matches_sub(filter_list: list[str], topic: str) -> None:
    trie = TopicTrie((f, f) for f in filter_list)
    expected = tuple(f for f in filter_list if topic_matches_sub(f, topic))
    assert trie.match(topic) == expected


@settings(max_examples=400, deadline=None)
@given(filters(), filters(), TOPICS)
def test_covering_implies_every_topic_of_the_narrow_filter_matches_the_broad_one(
    broad: str, narrow: str, topic: str
) -> None:
    if TopicTrie([(broad, broad)]).covering(narrow) and topic_matches_sub(narrow, topic):
        assert topic_matches_sub(broad, topic)


_ALPHABET = ["a", "b", "c", "$SYS", "", "z"]  # every level the filters use, and one none uses


def _topics_of(topic_filter: str) -> set[str]:
    """Topics standing for every topic ``topic_filter`` can match: each wildcard replaced by each
    level of the alphabet ('#' also by nothing and by two levels)."""
    topics = [""]
    for index, level in enumerate(topic_filter.split("/")):
        sep = "/" if index else ""
        if level == "+":
            topics = [t + sep + a for t in topics for a in _ALPHABET]
        elif level == "#":
            tails = [""] + [sep + a for a in _ALPHABET] + [sep + a + "/" + b for a in _ALPHABET for b in _ALPHABET]
            topics = [t + tail for t in topics for tail in tails]
        else:
            topics = [t + sep + level for t in topics]
    return {t for t in topics if t or topic_filter.startswith("#")}


@settings(max_examples=300, deadline=None)
@given(filters(), filters())
@example("+", "/#").via("discovered: the topic \"\" is not valid")
@example("/#", "+").via("discovered: the topic \"\" is not valid")
def test_overlapping_is_exactly_sharing_a_topic(first: str, second: str) -> None:
    assume(filter_error(first) is None and filter_error(second) is None)
    candidates = _topics_of(first) | _topics_of(second)
    shared = any(topic_matches_sub(first, t) and topic_matches_sub(second, t) for t in candidates)
    assert bool(TopicTrie([(first, first)]).overlapping(second)) == shared


@settings(max_examples=300, deadline=None)
@given(filters(), filters())
@example("/+/#", "/#").via("discovered: the topic \"\" is not valid")
def test_covering_is_exactly_matching_every_topic_of_the_narrow_filter(broad: str, narrow: str) -> None:
    assume(filter_error(broad) is None and filter_error(narrow) is None)
    every = all(topic_matches_sub(broad, t) for t in _topics_of(narrow) if topic_matches_sub(narrow, t))
    assert bool(TopicTrie([(broad, broad)]).covering(narrow)) == every


def test_queries_return_items_in_the_order_given_each_once() -> None:
    trie = TopicTrie([("a/#", "first"), ("+/b", "second"), ("a/b", "third"), ("a/+", "first")])
    assert trie.match("a/b") == ("first", "second", "third")
    assert trie.covering("a/b") == ("first", "second", "third")
    assert trie.overlapping("+/+") == ("first", "second", "third")
    assert trie.overlapping("$SYS/#") == ()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(filters(), st.sampled_from([0, 1])), min_size=1, max_size=8), TOPICS)
def test_minimal_subscription_set_receives_every_topic_at_the_highest_qos(
    wanted: list[tuple[str, int]], topic: str
) -> None:
    minimal = minimal_subscriptions(wanted)
    needed = [qos for f, qos in wanted if topic_matches_sub(f, topic)]
    granted = [qos for f, qos in minimal if topic_matches_sub(f, topic)]
    if needed:
        assert granted, f"{topic} is lost by {minimal}"
        assert max(granted) >= max(needed)
    assert {f for f, _ in minimal} <= {f for f, _ in wanted}


def test_covered_filter_is_not_subscribed_separately() -> None:
    assert minimal_subscriptions([("a/#", 1), ("a/+/x", 1), ("b/c", 0)]) == (("a/#", 1), ("b/c", 0))


def test_of_two_filters_that_cover_each_other_one_is_subscribed_at_the_higher_qos() -> None:
    # `/#` and `/+/#` match the same topics (`+` matches the empty level of `/`): dropping each
    # for the other subscribed nothing
    assert minimal_subscriptions([("/#", 0), ("/+/#", 1)]) == (("/#", 1),)
    assert minimal_subscriptions([("/+/#", 0), ("/#", 0), ("/a", 1)]) == (("/#", 1),)


def test_broad_filter_takes_the_qos_of_a_narrower_qos1_route() -> None:
    assert minimal_subscriptions([("a/#", 0), ("a/b", 1)]) == (("a/#", 1),)


def test_dollar_topics_are_not_matched_by_leading_wildcards() -> None:
    trie = TopicTrie([("#", "all"), ("+/x", "plus"), ("$SYS/#", "sys")])
    assert trie.match("$SYS/x") == ("sys",)
    assert trie.covering("$SYS/x") == ("sys",)
    assert trie.overlapping("+/+") == ("all", "plus")
    assert minimal_subscriptions([("#", 1), ("$SYS/#", 1)]) == (("#", 1), ("$SYS/#", 1))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(filters(), st.sampled_from([0, 1])), min_size=1, max_size=8), TOPICS)
def test_every_subscription_a_topic_matches_carries_the_qos_its_routes_need(
    wanted: list[tuple[str, int]], topic: str
) -> None:
    # Mosquitto on 3.1.1 delivers one copy at the QoS of whichever subscription matched first,
    # so every matching subscription must be at the highest QoS any route of the topic needs.
    needed = [qos for f, qos in wanted if topic_matches_sub(f, topic)]
    for f, qos in minimal_subscriptions(wanted):
        if topic_matches_sub(f, topic):
            assert qos >= max(needed)


def test_partly_overlapping_filters_take_the_higher_qos() -> None:
    assert minimal_subscriptions([("a/+/x", 0), ("a/y/+", 1), ("b", 0)]) == (("a/+/x", 1), ("a/y/+", 1), ("b", 0))
