"""Retained messages as each route chooses (docs/route-file.md#retained-messages): the route file
option, what the table routes and asks of the broker, how the source tells a resent copy, and that
a skip is counted and acknowledged."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import test_mqtt_source as scripted
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.model import Message, Record, Skipped
from gateway.pipeline.pipeline import Pipeline
from gateway.routefile.loader import load_routes_text
from gateway.routing.expressions import compile_expression as expr
from gateway.routing.table import Route, RouteTable
from gateway.source.acks import AckTracker
from gateway.source.packets import v5_request
from gateway.source.subscriptions import SubscriptionBook

fake = scripted.fake
config = scripted.config

FILE = """\
version: 1
{defaults}routes:
  - name: config
    topic: "cfg/#"
    stream: s1
    partition_key: "`k`"
{extra}"""


def route(name: str, topic: str, retained: Any = "new_subscription") -> Route:
    return Route(name, (topic,), "s", expr("`k`"), format="raw", retained=retained)


def live(topic: str = "cfg/a") -> Message:
    return Message(topic, b"x", 1, 0)


def retained(topic: str = "cfg/a", resent: bool = False) -> Message:
    return Message(topic, b"x", 1, 0, retain=True, resent=resent)


# --- the route file ------------------------------------------------------------------------------

def test_retained_defaults_to_new_subscription_and_takes_each_choice_from_route_or_defaults() -> None:
    result = load_routes_text(FILE.format(defaults="", extra=""), "r.yaml")
    assert result.table is not None and result.table.routes[0].retained == "new_subscription"
    for choice in ("always", "never", "new_subscription"):
        in_route = load_routes_text(FILE.format(defaults="", extra=f"    retained: {choice}\n"), "r.yaml")
        from_defaults = load_routes_text(FILE.format(defaults=f"defaults:\n  retained: {choice}\n", extra=""), "r.yaml")
        assert in_route.table is not None and in_route.table.routes[0].retained == choice
        assert from_defaults.table is not None and from_defaults.table.routes[0].retained == choice


@pytest.mark.parametrize("value", ["yes", "true", "skip", "1"])
def test_an_unknown_retained_choice_is_a_finding_on_its_line(value: str) -> None:
    result = load_routes_text(FILE.format(defaults="", extra=f"    retained: {value}\n"), "r.yaml")
    assert result.table is None
    assert any(f.line == 7 and "retained" in f.path for f in result.findings), result.findings


def test_changing_retained_changes_the_route_definition() -> None:
    assert route("a", "cfg/#", "always").definition != route("a", "cfg/#", "never").definition


# --- routing -------------------------------------------------------------------------------------

def test_live_messages_are_written_by_every_choice() -> None:
    table = RouteTable((route("a", "cfg/#", "always"), route("n", "cfg/#", "new_subscription"),
                        route("x", "cfg/#", "never")))
    assert [type(o) for o in table.route(live())] == [Record, Record, Record]


def test_a_retained_copy_for_a_new_subscription_is_skipped_only_by_never() -> None:
    table = RouteTable((route("a", "cfg/#", "always"), route("n", "cfg/#", "new_subscription"),
                        route("x", "cfg/#", "never")))
    a, n, x = table.route(retained())
    assert type(a) is Record and type(n) is Record
    assert x == Skipped("x", "retained message (retained: never)")


def test_a_resent_retained_copy_is_written_only_by_always() -> None:
    table = RouteTable((route("a", "cfg/#", "always"), route("n", "cfg/#", "new_subscription"),
                        route("x", "cfg/#", "never")))
    a, n, x = table.route(retained(resent=True))
    assert type(a) is Record
    assert n == Skipped("n", "retained message (retained: new_subscription)") and type(x) is Skipped


def test_each_subscription_asks_for_the_most_inclusive_choice_of_the_routes_sharing_its_topics() -> None:
    table = RouteTable((route("cfg", "cfg/#", "never"), route("cfg-a", "cfg/a", "always"),
                        route("dev", "dev/+/state", "never"), route("any", "+/x/state", "new_subscription"),
                        route("other", "other/y/#", "never")))
    assert dict(table.subscriptions) == {"cfg/#": 1, "dev/+/state": 1, "+/x/state": 1, "other/y/#": 1}
    # cfg/a (always) is covered by cfg/#; +/x/state shares dev/x/state with dev/+/state
    assert table.retain_handling == {"cfg/#": 0, "dev/+/state": 1, "+/x/state": 1, "other/y/#": 2}


def test_one_choice_for_every_route_is_the_handling_of_every_subscription() -> None:
    table = RouteTable((route("a", "a/#", "never"), route("b", "b/+", "never")))
    assert table.retain_handling == {"a/#": 2, "b/+": 2}
    assert RouteTable((route("a", "a/#"),)).retain_handling == {"a/#": 1}


# --- subscription options (MQTT 5) ---------------------------------------------------------------

def test_v5_subscribe_options_carry_each_filters_retain_handling_and_never_retain_as_published() -> None:
    handling = {"a/#": 0, "b/#": 2}.get
    (_, a), (_, b), (_, c) = v5_request([("a/#", 1), ("b/#", 1), ("c/#", 0)], True,
                                        lambda f: handling(f, 1))
    assert [o.retainHandling for o in (a, b, c)] == [SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE,
                                                     SubscribeOptions.RETAIN_DO_NOT_SEND,
                                                     SubscribeOptions.RETAIN_SEND_IF_NEW_SUB]
    assert not any(o.retainAsPublished for o in (a, b, c)) and a.noLocal and c.QoS == 0


def test_the_source_subscribes_with_the_route_tables_retain_handling(fake: Any) -> None:
    made = fake(subscriptions=[("a/#", 1), ("b/#", 1)], retain_handling={"a/#": 0, "b/#": 2})
    made.client.fire_connect()
    (_, mid, request), = made.client.sent("subscribe")
    options = dict(zip([f for f, _ in request], made.client.options[mid], strict=True))
    assert options["a/#"].retainHandling == 0 and options["b/#"].retainHandling == 2


def test_the_share_group_prefix_keeps_each_filters_retain_handling(fake: Any) -> None:
    made = fake(config(share_group="g"), subscriptions=[("a/#", 1)], retain_handling={"a/#": 2})
    made.client.fire_connect()
    (_, mid, request), = made.client.sent("subscribe")
    assert request[0][0] == "$share/g/a/#" and made.client.options[mid][0].retainHandling == 2


# --- resent copies -------------------------------------------------------------------------------

def _connected(book: SubscriptionBook, session_present: bool, v5: bool = False) -> None:
    book.new_connection(session_present=session_present, retain_handling=v5)
    subscribe, _ = book.plan()
    book.sent(1, subscribe)
    book.suback(1, [(q, "granted") for _, q in subscribe])


def test_on_mqtt311_a_resumed_session_makes_every_retained_copy_resent() -> None:
    book = SubscriptionBook()
    book.set_desired([("cfg/#", 1)])
    _connected(book, session_present=True)
    assert book.resent("cfg/a")
    _connected(book, session_present=False)           # the broker lost the session: all is new
    assert not book.resent("cfg/a")
    _connected(book, session_present=True)            # held now: granted on the previous connection
    assert book.resent("cfg/a")


def test_on_mqtt311_a_filter_added_on_a_live_resumed_session_is_new() -> None:
    book = SubscriptionBook()
    book.set_desired([("cfg/#", 1)])
    _connected(book, session_present=True)
    book.set_desired([("cfg/#", 1), ("dev/#", 1)])
    subscribe, _ = book.plan()
    assert book.resent("cfg/a") and not book.resent("dev/a")
    book.sent(2, subscribe)
    book.suback(2, [(1, "granted")])
    _connected(book, session_present=True)            # the next connection: held, like the rest
    assert book.resent("dev/a")


def test_on_mqtt5_the_broker_decides_unless_a_filter_is_asked_to_send_always() -> None:
    book = SubscriptionBook()
    book.set_desired([("cfg/#", 1), ("dev/#", 1)], {"cfg/#": 1, "dev/#": 0})
    _connected(book, session_present=True, v5=True)
    assert not book.resent("cfg/a")                   # Retain Handling 1: the broker knows its session
    assert book.resent("dev/a")                       # Retain Handling 0: sent again on every subscribe


def test_a_copy_naming_an_unknown_identifier_is_not_called_resent() -> None:
    book = SubscriptionBook()
    book.set_desired([("cfg/#", 1)])
    _connected(book, session_present=True)
    assert not book.resent("cfg/a", [12345])
    assert not book.resent("elsewhere/a")             # no subscription matches: when in doubt, write


def test_the_source_marks_a_resent_copy_and_only_a_retained_one(fake: Any) -> None:
    made = fake(config(protocol="3.1.1"), subscriptions=[("cfg/#", 1)])
    made.client.fire_connect(session_present=True)
    made.client.fire_message(b"cfg/a", b"x", mid=1, retain=True)
    made.client.fire_message(b"cfg/b", b"x", mid=2)
    first, second = made.pipeline.messages
    assert (first.retain, first.resent) == (True, True)
    assert (second.retain, second.resent) == (False, False)


# --- a skip is counted and acknowledged ----------------------------------------------------------

class Metrics:
    def __init__(self) -> None:
        self.skipped: dict[tuple[str, str], int] = {}

    def messages_skipped(self, route: str, reason: str, n: int = 1) -> None:
        self.skipped[(route, reason)] = self.skipped.get((route, reason), 0) + n

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def test_a_skipped_retained_message_is_acknowledged_at_once_counted_and_logged_once(caplog: Any) -> None:
    acked: list[int] = []
    metrics = Metrics()
    acks = AckTracker(SimpleNamespace(ack_many=lambda pairs: acked.extend(mid for mid, _qos in pairs)))
    table = RouteTable((route("x", "cfg/#", "never"),))
    pipeline = Pipeline(SimpleNamespace(current=table), acks, metrics, make_sink=lambda _: SimpleNamespace(
        put=lambda entries: None, send_now=lambda: None), backlog_capacity=10)
    with caplog.at_level("INFO", logger="gateway.pipeline"):
        pipeline.intake(retained("cfg/a"), 1, 1)
        pipeline.intake(retained("cfg/b"), 2, 1)
    pipeline.flush_counts()
    assert metrics.skipped == {("x", "retained"): 2}
    assert len([r for r in caplog.records if "skips retained messages" in r.getMessage()]) == 1
    assert acked == [1, 2] and acks.pending == 0


# --- explain -------------------------------------------------------------------------------------

TWO_CHOICES = """\
version: 1
routes:
  - {name: first, topic: "cfg/#", stream: s1, partition_key: "`k`"}
  - {name: none, topic: "cfg/#", stream: s2, partition_key: "`k`", retained: never}
"""


@pytest.mark.parametrize(("flags", "first", "none"), [
    ((), "record", "record"),
    (("--retain",), "record", "retained message (retained: never)"),
    (("--resent",), "retained message (retained: new_subscription)", "retained message (retained: never)"),
])
def test_explain_shows_whether_each_route_takes_a_retained_message(
        capsys: pytest.CaptureFixture[str], tmp_path: Any, flags: tuple[str, ...], first: str, none: str) -> None:
    import json

    from gateway.cli import main

    routes = tmp_path / "routes.yaml"
    routes.write_text(TWO_CHOICES, encoding="utf-8")
    main(["explain", str(routes), "--topic", "cfg/a", "--payload", "{}", *flags])
    out, err = capsys.readouterr()
    shown = {o["route"]: o.get("skipped", "record") for o in map(json.loads, out.splitlines())}
    assert shown == {"first": first, "none": none}
    assert ('"retained()": true' in err) == bool(flags)
