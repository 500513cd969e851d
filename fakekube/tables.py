"""Server-side printing: the ``meta.k8s.io/v1`` Table kubectl asks for when it prints
``get`` output (``Accept: application/json;as=Table;g=meta.k8s.io;v=v1``), for lists and
for the events of a ``get -w`` watch.

The columns follow the real API server's printers for the built-in kinds (``-o wide``
shows the priority-1 ones) and the CRDs' ``additionalPrinterColumns`` (``charts/``) for
the custom ones; a kind with neither has Name and Age, as a CRD without columns does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from fakekube import store as fs

Obj = dict[str, Any]
Column = tuple[str, str, int, Callable[[Obj], Any]]  # name, type, priority, cell


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def age(obj: Obj, *, now: datetime | None = None) -> str:
    """The age of an object as kubectl prints durations (``45s``, ``3m20s``, ``12m``,
    ``3h5m``, ``30h``, ``2d4h``, ``9d``)."""
    stamp = (obj.get("metadata") or {}).get("creationTimestamp")
    if not isinstance(stamp, str):
        return "<unknown>"
    try:
        created = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    s = max(0, int(((now or datetime.now(UTC)) - created).total_seconds()))
    m, h = s // 60, s // 3600
    if s < 120:
        return f"{s}s"
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if h < 24 * 8:
        return f"{h // 24}d{h % 24}h" if h % 24 else f"{h // 24}d"
    return f"{h // 24}d"


def _get(obj: Obj, *path: str) -> Any:
    at: Any = obj
    for key in path:
        if not isinstance(at, dict):
            return None
        at = at.get(key)
    return at


def _selector(sel: Any) -> str:
    """A label selector as kubectl prints one (``app=web,tier in (a,b)``; ``<none>``)."""
    if not isinstance(sel, dict):
        return "<none>"
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for expr in sel.get("matchExpressions") or []:
        if not isinstance(expr, dict):
            continue
        op, key = str(expr.get("operator")), str(expr.get("key"))
        values = ",".join(str(v) for v in expr.get("values") or [])
        shown = {"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": key}
        parts.append(shown.get(op, f"!{key}"))
    return ",".join(parts) or "<none>"


def _ports(obj: Obj) -> str:
    ports = _get(obj, "spec", "ports") or []
    return ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in ports) or "<none>"


def _ready(obj: Obj) -> str:
    containers = _get(obj, "spec", "containers") or []
    running = _get(obj, "status", "phase") == "Running"
    return f"{len(containers) if running else 0}/{len(containers)}"


def _count(path: tuple[str, ...]) -> Callable[[Obj], int]:
    return lambda o: len(_get(o, *path) or [])


NAME: Column = ("Name", "string", 0, lambda o: _get(o, "metadata", "name") or "")
AGE: Column = ("Age", "string", 0, age)
COLUMNS: dict[fs.Resource, list[Column]] = {
    fs.PODS: [
        NAME,
        ("Ready", "string", 0, _ready),
        ("Status", "string", 0, lambda o: _get(o, "status", "phase") or "Pending"),
        ("Restarts", "integer", 0, lambda o: 0),
        AGE,
        ("IP", "string", 1, lambda o: _get(o, "status", "podIP") or "<none>"),
        ("Node", "string", 1, lambda o: _get(o, "spec", "nodeName") or "<none>"),
    ],
    fs.NAMESPACES: [
        NAME,
        ("Status", "string", 0, lambda o: _get(o, "status", "phase") or "Active"),
        AGE,
    ],
    fs.SERVICES: [
        NAME,
        ("Type", "string", 0, lambda o: _get(o, "spec", "type") or "ClusterIP"),
        ("Cluster-IP", "string", 0, lambda o: _get(o, "spec", "clusterIP") or "<none>"),
        ("Port(s)", "string", 0, _ports),
        AGE,
        (
            "Selector",
            "string",
            1,
            lambda o: _selector({"matchLabels": _get(o, "spec", "selector")}),
        ),
    ],
    fs.NODES: [NAME, ("Status", "string", 0, lambda o: "Ready"), AGE],
    fs.EVENTS: [
        ("Last Seen", "string", 0, age),
        ("Type", "string", 0, lambda o: o.get("type") or "Normal"),
        ("Reason", "string", 0, lambda o: o.get("reason") or ""),
        (
            "Object",
            "string",
            0,
            lambda o: (
                f"{str(_get(o, 'involvedObject', 'kind') or '').lower()}/"
                f"{_get(o, 'involvedObject', 'name') or ''}"
            ),
        ),
        ("Message", "string", 0, lambda o: o.get("message") or ""),
    ],
    fs.DEPLOYMENTS: [
        NAME,
        ("Ready", "string", 0, lambda o: f"0/{_get(o, 'spec', 'replicas') or 1}"),
        AGE,
    ],
    fs.NETWORK_POLICIES: [
        NAME,
        ("Pod-Selector", "string", 0, lambda o: _selector(_get(o, "spec", "podSelector"))),
        AGE,
    ],
    fs.APPLICATION_NETWORK_POLICIES: [
        NAME,
        ("Pod-Selector", "string", 0, lambda o: _selector(_get(o, "spec", "podSelector"))),
        AGE,
    ],
    fs.CLUSTER_NETWORK_POLICIES: [
        NAME,
        ("Tier", "string", 0, lambda o: _get(o, "spec", "tier") or ""),
        ("Priority", "integer", 0, lambda o: _get(o, "spec", "priority")),
        AGE,
    ],
    fs.POLICY_ENDPOINTS: [
        NAME,
        ("Policy", "string", 0, lambda o: _get(o, "spec", "policyRef", "name") or ""),
        ("Pods", "integer", 0, _count(("spec", "podSelectorEndpoints"))),
        AGE,
    ],
    fs.CLUSTER_POLICY_ENDPOINTS: [
        NAME,
        ("Policy", "string", 0, lambda o: _get(o, "spec", "policyRef", "name") or ""),
        ("Pods", "integer", 0, _count(("spec", "podSelectorEndpoints"))),
        AGE,
    ],
}


def columns(resource: fs.Resource) -> list[Column]:
    return COLUMNS.get(resource, [NAME, AGE])


def table(
    resource: fs.Resource,
    objects: Iterable[Obj],
    *,
    resource_version: str = "",
    include_object: str = "Metadata",
    definitions: bool = True,
) -> Obj:
    """A Table of ``objects``: one row each, with the object (``includeObject``: Object,
    Metadata as a PartialObjectMetadata, or None)."""
    cols = columns(resource)
    rows = []
    for obj in objects:
        row: Obj = {"cells": [cell(obj) for _, _, _, cell in cols]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj.get("metadata") or {},
            }
        rows.append(row)
    out: Obj = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version} if resource_version else {},
        "rows": rows,
    }
    if definitions:
        out["columnDefinitions"] = [
            {
                "name": name,
                "type": kind,
                "format": "name" if name == "Name" else "",
                "description": name,
                "priority": priority,
            }
            for name, kind, priority, _ in cols
        ]
    return out
