"""Route expressions: load-time checks, gateway functions, and the fast paths agree with jmespath."""

from __future__ import annotations

import json
import re
import types
from typing import Any

import jmespath
import jmespath.functions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.model import REASON_CODES, Message, Record, Rejected
from gateway.routefile.loader import load_routes_text
from gateway.routing.cost import EVALUATION_BUDGET, ExpressionTooLarge
from gateway.routing.expressions import CONTEXT, ExpressionError, compile_expression

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from("abc"), children, max_size=3),
    max_leaves=10,
)
PATHS = st.lists(st.sampled_from("abc"), min_size=1, max_size=4).map(".".join)


@settings(max_examples=500, deadline=None)
@given(PATHS, JSON)
def test_field_path_fast_path_matches_jmespath(path: str, document: object) -> None:
    assert compile_expression(path).evaluate(document) == jmespath.search(path, document)


@pytest.mark.parametrize(
    ("source", "fragment", "offset"),
    [
        ("nosuch(@)", "unknown function nosuch()", 0),
        ("length(@, @)", "takes 1 argument(s), got 2", 0),
        ("topic(`1`, `2`)", "takes 0 to 1 argument(s)", 0),
        ("uuid(@)", "takes 0 argument(s)", 0),
        ("a.[", "unexpected end", 3),
        ("a ^ b", "Unknown token", 2),
    ],
)
def test_bad_expressions_are_refused_at_load_time_with_an_offset(source: str, fragment: str, offset: int) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source)
    assert fragment in caught.value.message
    assert caught.value.offset == offset


def test_topic_functions_mirror_aws_iot_templates() -> None:
    CONTEXT.set("factory/line1/welder/w7", 1700000000000)
    assert compile_expression("topic()").evaluate(None) == "factory/line1/welder/w7"
    assert compile_expression("topic(`3`)").evaluate(None) == "welder"
    assert compile_expression("topic(`-1`)").evaluate(None) == "w7"
    assert compile_expression("topic(`9`)").evaluate(None) is None
    assert compile_expression("timestamp()").evaluate(None) == 1700000000000
    assert len(compile_expression("uuid()").evaluate(None)) == 36
    assert compile_expression("join('-', [topic(`2`), name])").evaluate({"name": "d"}) == "line1-d"


def test_raw_safe_expressions_do_not_reference_the_payload() -> None:
    assert not compile_expression("topic(`2`)").references_payload
    assert not compile_expression("`static`").references_payload
    assert compile_expression("name").references_payload


# --- what an expression may cost (docs/route-file.md#limits) -----------------------------------


def nested_to_string(levels: int, inner: str = "data") -> str:
    """``to_string([to_string([... data ...])])``: each level doubles the escaping of the last."""
    source = inner
    for _ in range(levels):
        source = f"to_string([{source}])"
    return source


def test_forty_nested_levels_are_refused_at_load_time_at_the_first_call_too_deep() -> None:
    source = nested_to_string(40)
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source)
    assert caught.value.kind == "nesting"
    assert "nest 80 levels deep; at most 16" in caught.value.message
    calls = [m.start() for m in re.finditer(r"to_string\(", source)]
    assert caught.value.offset == calls[8]  # depth 17: the ninth call, counted from the outside


def test_sixteen_levels_are_allowed_and_evaluate_as_jmespath_does() -> None:
    source = nested_to_string(8)
    assert compile_expression(source).evaluate({"data": 'x"'}) == jmespath.search(source, {"data": 'x"'})


@pytest.fixture
def dumps_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every JSON text jmespath's to_string() makes, as it makes them."""
    made: list[int] = []

    def dumps(value: Any, **kwargs: Any) -> str:
        text = json.dumps(value, **kwargs)
        made.append(len(text))
        return text

    monkeypatch.setattr(jmespath.functions, "json", types.SimpleNamespace(dumps=dumps, loads=json.loads))
    return made


def test_an_expression_under_the_bound_that_still_grows_too_large_stops_within_the_budget(
        dumps_calls: list[int]) -> None:
    expression = compile_expression(nested_to_string(8))  # 16 levels: allowed
    with pytest.raises(ExpressionTooLarge) as caught:
        expression.evaluate({"data": '"' * 300_000})  # unguarded, level 8 alone would be 77 MB
    assert 0 < len(dumps_calls) < 8  # it stopped early ...
    assert max(dumps_calls) <= EVALUATION_BUDGET  # ... and never built a text over the budget
    assert caught.value.budget == EVALUATION_BUDGET < caught.value.spent


def test_repeating_the_input_without_copying_it_is_caught_before_it_is_encoded() -> None:
    doubling = " | ".join(["[@, @]"] * 30)  # 2^30 copies of the payload once encoded
    with pytest.raises(ExpressionTooLarge):
        compile_expression(doubling).evaluate({"a": "x" * 100})
    flattening = " | ".join(["[@, @, @, @, @, @, @, @][]"] * 10)  # lists 8^10 items long
    with pytest.raises(ExpressionTooLarge):
        compile_expression(flattening).evaluate(list(range(100)))


def test_a_message_over_the_budget_is_rejected_with_its_own_reason_code() -> None:
    text = ("version: 1\nroutes:\n  - name: escaping\n    topic: a/#\n    stream: s\n    partition_key: topic()\n"
            f"    transform: \"{nested_to_string(8)}\"\n")
    result = load_routes_text(text, "routes.yaml")
    assert result.table is not None, result.findings
    payload = json.dumps({"data": '"' * 300_000}).encode()
    (outcome,) = result.table.route(Message("a/b", payload, 1, 0))
    assert isinstance(outcome, Rejected) and outcome.code == "expression_too_large" in REASON_CODES
    assert outcome.reason == f"expression output too large: over {EVALUATION_BUDGET} bytes and items for one message"
    (small,) = result.table.route(Message("a/b", b'{"data": "ok"}', 1, 0))
    assert isinstance(small, Record)


GENERIC = ["[a, b]", "{x: a, y: b}", "a[*].b", "a[]", "a[?b]", "to_string(@)", "join(',', a)", "sort(a)",
           "map(&to_string(@), a)", "a[1:]", "values(@)", "[a, b][]", "*.a", "a[?b].c | [0]", "keys(@)"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(GENERIC), JSON)
def test_the_budgeted_interpreter_agrees_with_jmespath(source: str, document: object) -> None:
    try:
        expected: object = jmespath.search(source, document)
    except jmespath.exceptions.JMESPathError as error:
        expected = type(error)
    try:
        got: object = compile_expression(source).evaluate(document)
    except jmespath.exceptions.JMESPathError as error:
        got = type(error)
    assert got == expected


def test_metadata_functions_read_the_message_being_routed() -> None:
    from gateway.model import Message

    message = Message("plant/7/welder", b"{}", 1, 1700000000000, retain=True,
                      user_properties=(("site", "plant-7"), ("shift", "a"), ("site", "plant-8")),
                      content_type="application/json")
    CONTEXT.set(message.topic, message.received_ms, message)
    assert compile_expression("qos()").evaluate(None) == 1
    assert compile_expression("retained()").evaluate(None) is True
    assert compile_expression("content_type()").evaluate(None) == "application/json"
    assert compile_expression("user_property('shift')").evaluate(None) == "a"
    assert compile_expression("user_property('site')").evaluate(None) == "plant-8"  # sent twice: the last value
    assert compile_expression("user_property('absent')").evaluate(None) is None
    assert compile_expression("user_properties()").evaluate(None) == {"site": "plant-8", "shift": "a"}
    envelope = compile_expression("merge(@, {topic: topic(), received_at: timestamp(), qos: qos()})")
    assert envelope.evaluate({"name": "d"}) == {"name": "d", "topic": "plant/7/welder",
                                                "received_at": 1700000000000, "qos": 1}


def test_metadata_functions_are_null_outside_routing_and_empty_without_mqtt5_properties() -> None:
    from gateway.model import Message

    CONTEXT.set("t", 0)
    assert compile_expression("[qos(), retained(), content_type(), user_property('a'), user_properties()]"
                              ).evaluate({}) == [None, None, None, None, None]
    CONTEXT.set("t", 0, Message("t", b"", 0, 0))
    assert compile_expression("[qos(), retained(), content_type(), user_property('a'), user_properties()]"
                              ).evaluate({}) == [0, False, None, None, {}]


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("qos(@)", "function qos() takes 0 argument(s), got 1"),
        ("retained(`1`)", "function retained() takes 0 argument(s), got 1"),
        ("user_property()", "function user_property() takes 1 argument(s), got 0"),
        ("user_properties('a')", "function user_properties() takes 0 argument(s), got 1"),
        ("content_type(@)", "function content_type() takes 0 argument(s), got 1"),
    ],
)
def test_metadata_functions_have_their_arity_checked_at_load_time(source: str, fragment: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source)
    assert fragment in caught.value.message and caught.value.kind == "function"


def test_user_property_name_must_be_a_string() -> None:
    from jmespath.exceptions import JMESPathTypeError

    from gateway.model import Message

    CONTEXT.set("t", 0, Message("t", b"", 1, 0))
    with pytest.raises(JMESPathTypeError):
        compile_expression("user_property(`1`)").evaluate(None)


def test_metadata_functions_never_reference_the_payload() -> None:
    for source in ("qos()", "retained()", "content_type()", "user_property('a')", "user_properties()"):
        assert not compile_expression(source).references_payload
