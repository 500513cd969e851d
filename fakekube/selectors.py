"""Label and field selectors as the Kubernetes API server parses and applies them.

Label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``,
``!a``, comma-separated (all must hold). Field selectors: ``path=value``,
``path==value``, ``path!=value`` on dotted paths (``metadata.name``, ``spec.nodeName``,
``status.phase``...).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]


class SelectorError(ValueError):
    pass


_SET_RE = re.compile(r"^\s*([A-Za-z0-9_.\-/]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_RE = re.compile(r"^\s*([A-Za-z0-9_.\-/]+)\s*(==|=|!=)\s*([A-Za-z0-9_.\-]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_.\-/]+)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p for p in parts if p.strip()]


LabelCheck = Callable[[Mapping[str, str]], bool]


def _equals(key: str, value: str, *, negate: bool) -> LabelCheck:
    def check(labels: Mapping[str, str]) -> bool:
        return (labels.get(key) == value) != negate

    return check


def _member(key: str, values: set[str], *, negate: bool) -> LabelCheck:
    def check(labels: Mapping[str, str]) -> bool:
        return (labels.get(key) in values) != negate

    return check


def _exists(key: str, *, negate: bool) -> LabelCheck:
    def check(labels: Mapping[str, str]) -> bool:
        return (key in labels) != negate

    return check


def label_selector(selector: str | None) -> LabelCheck:
    """A predicate over a labels mapping."""
    checks: list[LabelCheck] = []
    for term in _split(selector or ""):
        if m := _SET_RE.match(term):
            key, op, raw = m.groups()
            values = {v.strip() for v in raw.split(",") if v.strip()}
            checks.append(_member(key, values, negate=op == "notin"))
        elif m := _EQ_RE.match(term):
            key, op, value = m.groups()
            checks.append(_equals(key, value, negate=op == "!="))
        elif m := _EXISTS_RE.match(term):
            neg, key = m.groups()
            checks.append(_exists(key, negate=bool(neg)))
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")
    return lambda labels: all(c(labels) for c in checks)


def _field(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def _field_equals(path: str, value: str, *, negate: bool) -> Predicate:
    def check(obj: Mapping[str, Any]) -> bool:
        return (_field(obj, path) == value) != negate

    return check


def field_selector(selector: str | None) -> Predicate:
    """A predicate over a whole object."""
    checks: list[Predicate] = []
    for term in _split(selector or ""):
        m = _EQ_RE.match(term)
        if not m:
            raise SelectorError(f"invalid field selector: {term!r}")
        path, op, value = m.groups()
        checks.append(_field_equals(path, value, negate=op == "!="))
    return lambda obj: all(c(obj) for c in checks)


def object_matches(obj: Mapping[str, Any], *, labels: str | None, fields: str | None) -> bool:
    meta = obj.get("metadata") or {}
    return label_selector(labels)(meta.get("labels") or {}) and field_selector(fields)(obj)
