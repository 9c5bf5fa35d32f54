"""Route expressions: load-time checks, gateway functions, and the fast paths agree with jmespath."""

from __future__ import annotations

import jmespath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
