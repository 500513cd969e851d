"""The field schemas strict field validation checks against (``fieldValidation=Strict``,
kubectl's default): NetworkPolicy's, written here in OpenAPI v3 form for the fields it
has, and the custom resources' own, read from the chart's CRDs (``charts/``), so that a
field the chart's schema does not know is refused here as a cluster would refuse it.

Only field names are checked (validation proper is :mod:`fakekube.admission`'s): an
object schema with ``properties`` admits those keys, unless it preserves unknown fields
or takes ``additionalProperties`` (a map).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from fakekube import store as fs

Obj = dict[str, Any]
CHART_CRDS = Path(__file__).resolve().parents[1] / "charts" / "np-node-agent" / "templates"

_STR: Obj = {"type": "string"}
_MAP: Obj = {"type": "object", "additionalProperties": _STR}


def _obj(**props: Obj) -> Obj:
    return {"type": "object", "properties": props}


def _arr(items: Obj) -> Obj:
    return {"type": "array", "items": items}


_SELECTOR = _obj(
    matchLabels=_MAP,
    matchExpressions=_arr(_obj(key=_STR, operator=_STR, values=_arr(_STR))),
)
_PEER = _obj(
    ipBlock=_obj(cidr=_STR, **{"except": _arr(_STR)}),
    podSelector=_SELECTOR,
    namespaceSelector=_SELECTOR,
)
_PORT = _obj(protocol=_STR, port={"x-kubernetes-int-or-string": True}, endPort={"type": "integer"})
NETWORK_POLICY: Obj = _obj(
    spec=_obj(
        podSelector=_SELECTOR,
        policyTypes=_arr(_STR),
        ingress=_arr(_obj(ports=_arr(_PORT), **{"from": _arr(_PEER)})),
        egress=_arr(_obj(ports=_arr(_PORT), to=_arr(_PEER))),
    ),
    status={"type": "object", "x-kubernetes-preserve-unknown-fields": True},
)


def load() -> None:
    """Read the chart's CRD schemas now (they are read once, at first use)."""
    _crd_schemas()


@functools.cache
def _crd_schemas() -> dict[tuple[str, str, str], Obj]:
    """(group, version, kind) -> openAPIV3Schema, from the chart's CRD templates (their
    Helm lines dropped)."""
    out: dict[tuple[str, str, str], Obj] = {}
    for path in sorted(CHART_CRDS.glob("crd*.yaml")):
        text = "\n".join(line for line in path.read_text().splitlines() if "{{" not in line)
        for doc in yaml.safe_load_all(text):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec.get("versions") or []:
                schema = (version.get("schema") or {}).get("openAPIV3Schema")
                if isinstance(schema, dict):
                    out[(spec["group"], version["name"], spec["names"]["kind"])] = schema
    return out


def schema_for(resource: fs.Resource) -> Obj | None:
    if resource == fs.NETWORK_POLICIES:
        return NETWORK_POLICY
    return _crd_schemas().get((resource.group, resource.version, resource.kind))


def unknown_fields(value: Any, schema: Obj, path: str = "") -> list[str]:
    """The dotted paths of the fields of ``value`` that ``schema`` does not know."""
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [f for item in value for f in unknown_fields(item, schema["items"], path)]
    if not isinstance(value, dict):
        return []
    props = schema.get("properties")
    extra = schema.get("additionalProperties")
    out: list[str] = []
    for key, sub in value.items():
        where = f"{path}.{key}" if path else key
        if key in ("apiVersion", "kind", "metadata") and not path:
            continue
        if isinstance(props, dict) and key in props:
            out += unknown_fields(sub, props[key], where)
        elif isinstance(extra, dict):
            out += unknown_fields(sub, extra, where)
        elif (
            props is not None
            and not schema.get("x-kubernetes-preserve-unknown-fields")
            and not extra
        ):
            out.append(where)
    return out
