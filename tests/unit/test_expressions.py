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
