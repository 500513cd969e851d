"""Kubernetes LabelSelector objects (matchLabels, matchExpressions) as predicates."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Labels = Mapping[str, str]
Matcher = Callable[[Labels], bool]


class SelectorError(ValueError):
    pass


def _expression(expr: Mapping[str, Any]) -> Matcher:
    key = expr.get("key")
    op = expr.get("operator")
    values = set(expr.get("values") or [])
    if not key or op not in ("In", "NotIn", "Exists", "DoesNotExist"):
        raise SelectorError(f"invalid matchExpression {dict(expr)!r}")
    if op in ("In", "NotIn") and not values:
        raise SelectorError(f"operator {op} needs values ({key})")
    if op == "In":
        return lambda labels: labels.get(key) in values
    if op == "NotIn":
        return lambda labels: labels.get(key) not in values
    if op == "Exists":
        return lambda labels: key in labels
    return lambda labels: key not in labels


def compile_selector(selector: Mapping[str, Any] | None) -> Matcher:
    """``None`` matches nothing (callers decide what an absent selector means);
    ``{}`` matches everything."""
    if selector is None:
        return lambda labels: False
    match_labels = dict(selector.get("matchLabels") or {})
    checks = [_expression(e) for e in selector.get("matchExpressions") or []]

    def matches(labels: Labels) -> bool:
        return all(labels.get(k) == v for k, v in match_labels.items()) and all(
            c(labels) for c in checks
        )

    return matches
