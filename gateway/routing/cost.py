"""What a route expression may cost: a nesting bound checked at load time, a budget per message.

Why: JMESPath lets a short expression grow its output exponentially. ``to_string([...])`` escapes
the quotes of what it wraps, so each level doubles the output: 27 nested levels once cost 684 MB
per message and 40 levels ran out of memory, after ``validate`` had passed the file. Multi-selects
(``[@, @]``) repeat their input without copying it, so the cost appears only when something
encodes the result. Two guards, both documented in docs/route-file.md#limits:

* at load time, ``deepest_nesting`` measures how deeply function calls, lists and objects
  (``f(...)``, ``[...]``, ``{...}``) nest; the loader refuses more than ``MAX_NESTING`` levels;
* per message, ``evaluate`` runs the expression in an interpreter that charges a budget for what
  it builds (8 units per list or object item, 1 per character of a string ``to_string`` or
  ``join`` makes), and then measures the encoded size of the result. Past ``EVALUATION_BUDGET``
  either way, it stops and raises ``ExpressionTooLarge``, and the router rejects the message
  (reason code ``expression_too_large``, so it is dead-lettered).

Invariant: one evaluation allocates at most a small multiple of ``EVALUATION_BUDGET`` bytes (the
budget is charged before every allocation that could exceed it, except the output of one
``to_string``, which is at most six times its charged estimate), and it stops as soon as the
budget is spent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Final

from jmespath.visitor import Options, TreeInterpreter

__all__ = ["EVALUATION_BUDGET", "MAX_NESTING", "ExpressionTooLarge", "deepest_nesting", "encoded_size_at_least",
           "evaluate", "may_grow"]

MAX_NESTING: Final = 16
"""Function calls, lists and objects nested deeper than this are refused at load time."""

EVALUATION_BUDGET: Final = 16 * 1024 * 1024
"""Units one evaluation may spend: above the largest record a stream accepts (10 MiB)."""

_CONTAINERS: Final = (list, dict)
_ITEM: Final = 8  # units per list or object item built: the size of a reference
_GROWING: Final = frozenset({"function_expression", "multi_select_list", "multi_select_dict"})


class ExpressionTooLarge(Exception):
    """An evaluation that spent its budget; ``spent`` is what it had charged when it stopped."""

    def __init__(self, spent: int, budget: int) -> None:
        super().__init__(f"expression output too large: over {budget} bytes and items for one message")
        self.spent = spent
        self.budget = budget


def _children(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for child in node.get("children", ()):
        if isinstance(child, dict):
            yield child


def deepest_nesting(parsed: dict[str, Any]) -> tuple[int, tuple[str, int] | None]:
    """How deeply calls, lists and objects nest in ``parsed``, and the first function call deeper
    than ``MAX_NESTING`` as (name, how many calls of that name come before it in pre-order)."""
    deepest, first_too_deep = 0, None
    calls: dict[str, int] = {}
    stack: list[tuple[dict[str, Any], int]] = [(parsed, 0)]
    while stack:  # pre-order: children pushed in reverse, so calls are met in the order written
        node, depth = stack.pop()
        if node.get("type") in _GROWING:
            depth += 1
            deepest = max(deepest, depth)
        if node.get("type") == "function_expression":
            name = node["value"]
            if depth > MAX_NESTING and first_too_deep is None:
                first_too_deep = (name, calls.get(name, 0))
            calls[name] = calls.get(name, 0) + 1
        stack.extend((child, depth) for child in reversed(list(_children(node))))
    return deepest, first_too_deep


def may_grow(parsed: dict[str, Any]) -> bool:
    """False when the result can only be a part of the input (no call, list or object builds one)."""
    stack = [parsed]
    while stack:
        node = stack.pop()
        if node.get("type") in _GROWING:
            return True
        stack.extend(_children(node))
    return False


def _scalar_size(item: Any) -> int:
    return len(item) + 2 if isinstance(item, str) else 1


def _members(item: list[Any] | dict[str, Any]) -> Any:
    return item if isinstance(item, list) else item.values()


def _container_size(item: list[Any] | dict[str, Any], sizes: dict[int, int]) -> int:
    """The size of ``item`` whose nested lists and objects are all in ``sizes`` already."""
    total = 1 + max(1, len(item))  # brackets and separators
    if isinstance(item, dict):
        total += sum(len(k) + 3 if isinstance(k, str) else 4 for k in item)  # '"key":'
    for member in _members(item):
        total += sizes[id(member)] if isinstance(member, _CONTAINERS) else _scalar_size(member)
    return total


def encoded_size_at_least(value: Any, limit: int) -> int:
    """A lower bound of ``value``'s JSON size, exact enough to compare with ``limit``.

    Each list and object is measured once however often it is referenced (``[@, @]`` nested
    sixteen deep is 65,536 copies of the input in JSON, and 16 lists in memory), so the walk costs
    what the value holds in memory, not what it would encode to; it stops once the bound passes
    ``limit``.
    """
    if not isinstance(value, _CONTAINERS):
        return _scalar_size(value)
    sizes: dict[int, int] = {}
    if not any(isinstance(m, _CONTAINERS) for m in _members(value)):
        return _container_size(value, sizes)  # flat: the common small result
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, children_measured = stack.pop()
        if id(item) in sizes:
            continue
        if not children_measured:
            nested = [m for m in _members(item) if isinstance(m, _CONTAINERS) and id(m) not in sizes]
            if nested:
                stack.append((item, True))
                stack.extend((m, False) for m in nested)
                continue
        total = _container_size(item, sizes)
        if total > limit:
            return total
        sizes[id(item)] = total
    return sizes[id(value)]


class _BudgetedInterpreter(TreeInterpreter):
    """jmespath's interpreter, charging ``spent`` for what each step builds (see the module doc)."""

    def __init__(self, options: Options) -> None:
        super().__init__(options)
        self.spent = 0
        self.budget = EVALUATION_BUDGET

    def charge(self, units: int) -> None:
        self.spent += units
        if self.spent > self.budget:
            raise ExpressionTooLarge(self.spent, self.budget)

    def visit_function_expression(self, node: dict[str, Any], value: Any) -> Any:
        args = [self.visit(child, value) for child in node["children"]]
        name = node["value"]
        if name == "to_string" and args and not isinstance(args[0], str):
            estimate = encoded_size_at_least(args[0], self.budget - self.spent)
            self.charge(estimate)
            result = self._functions.call_function(name, args)
            self.charge(max(0, len(result) - estimate))  # escapes: at most six times the estimate
            return result
        if name == "join" and len(args) == 2 and isinstance(args[1], list) and isinstance(args[0], str):
            self.charge(sum(len(s) for s in args[1] if isinstance(s, str)) + len(args[0]) * len(args[1]))
        result = self._functions.call_function(name, args)
        if isinstance(result, _CONTAINERS):
            self.charge(_ITEM * len(result))
        return result

    def visit_multi_select_list(self, node: dict[str, Any], value: Any) -> Any:
        self.charge(_ITEM * len(node["children"]))
        return super().visit_multi_select_list(node, value)

    def visit_multi_select_dict(self, node: dict[str, Any], value: Any) -> Any:
        self.charge(_ITEM * len(node["children"]))
        return super().visit_multi_select_dict(node, value)

    def visit_flatten(self, node: dict[str, Any], value: Any) -> Any:
        base = self.visit(node["children"][0], value)
        if not isinstance(base, list):
            return None
        self.charge(_ITEM * sum(len(e) if isinstance(e, list) else 1 for e in base))  # before building it
        merged: list[Any] = []
        for element in base:
            if isinstance(element, list):
                merged.extend(element)
            else:
                merged.append(element)
        return merged

    def visit_projection(self, node: dict[str, Any], value: Any) -> Any:
        result = super().visit_projection(node, value)
        if result is not None:
            self.charge(_ITEM * len(result))
        return result

    def visit_value_projection(self, node: dict[str, Any], value: Any) -> Any:
        result = super().visit_value_projection(node, value)
        if result is not None:
            self.charge(_ITEM * len(result))
        return result

    def visit_filter_projection(self, node: dict[str, Any], value: Any) -> Any:
        result = super().visit_filter_projection(node, value)
        if result is not None:
            self.charge(_ITEM * len(result))
        return result

    def visit_slice(self, node: dict[str, Any], value: Any) -> Any:
        result = super().visit_slice(node, value)
        if result is not None:
            self.charge(_ITEM * len(result))
        return result


class _PerThread(threading.local):
    interpreters: dict[int, _BudgetedInterpreter]

    def __init__(self) -> None:
        self.interpreters = {}


_PER_THREAD = _PerThread()


def evaluate(parsed: dict[str, Any], document: Any, options: Options, *, check_output: bool = True,
             budget: int = EVALUATION_BUDGET) -> Any:
    """``parsed`` applied to ``document`` within ``budget``; raises ExpressionTooLarge past it.

    ``check_output`` also bounds the encoded size of the result (pass ``may_grow(parsed)``: a
    result that is only a part of the input need not be measured).
    """
    interpreter = _PER_THREAD.interpreters.get(id(options))
    if interpreter is None:
        interpreter = _PER_THREAD.interpreters[id(options)] = _BudgetedInterpreter(options)
    interpreter.spent, interpreter.budget = 0, budget
    result = interpreter.visit(parsed, document)
    if check_output:
        size = encoded_size_at_least(result, budget)
        if size > budget:
            raise ExpressionTooLarge(size, budget)
    return result
