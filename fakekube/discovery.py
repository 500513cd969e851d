"""What a client asks the API server about itself before it asks for objects: the
discovery documents (``/api``, ``/apis``, ``/api/v1``, ``/apis/<group>/<version>``)
and the OpenAPI v3 index and documents (``/openapi/v3``).

kubectl maps a kind or a short name (``netpol``) to a resource through discovery, and
before it writes an object it looks in the OpenAPI document of the object's group and
version for a PATCH operation of that kind taking the ``fieldValidation`` parameter:
found, it leaves validation to the server (``fieldValidation=Strict``), which is what
this server does (:mod:`fakekube.admission`). The documents describe operations only,
no schemas: kubectl then computes strategic merge patches from its own built-in types,
and JSON merge patches for the custom resources.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from fakekube.store import Resource

Obj = dict[str, Any]
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def group_versions(resources: Iterable[Resource]) -> dict[tuple[str, str], list[Resource]]:
    """(group, version) -> its resources, in the order given."""
    out: dict[tuple[str, str], list[Resource]] = {}
    for r in resources:
        out.setdefault((r.group, r.version), []).append(r)
    return out


def api_versions(server: str) -> Obj:
    """``/api``: the core group's versions."""
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}],
    }


def api_group_list(resources: Iterable[Resource]) -> Obj:
    """``/apis``: every named group and its versions."""
    groups: dict[str, list[str]] = {}
    for group, version in group_versions(resources):
        if group:
            groups.setdefault(group, []).append(version)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                "preferredVersion": {
                    "groupVersion": f"{group}/{versions[0]}",
                    "version": versions[0],
                },
            }
            for group, versions in groups.items()
        ],
    }


def api_resource_list(group: str, version: str, resources: Iterable[Resource]) -> Obj | None:
    """``/api/v1`` or ``/apis/<group>/<version>``: the resources served there (None:
    no such group version)."""
    served = group_versions(resources).get((group, version))
    if served is None:
        return None
    listed: list[Obj] = []
    for r in served:
        listed.append(
            {
                "name": r.plural,
                "singularName": r.kind.lower(),
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": VERBS,
                **({"shortNames": list(r.short_names)} if r.short_names else {}),
            }
        )
        listed.append(
            {
                "name": f"{r.plural}/status",
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }
        )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": listed,
    }


def _path(group: str, version: str) -> str:
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def openapi_v3_index(resources: Iterable[Resource]) -> Obj:
    """``/openapi/v3``: where each group version's document is (the hash makes a client's
    cache of it exact)."""
    paths = {}
    for (group, version), served in group_versions(resources).items():
        digest = hashlib.sha256(json.dumps(openapi_v3_document(served)).encode()).hexdigest()
        paths[_path(group, version)] = {
            "serverRelativeURL": f"/openapi/v3/{_path(group, version)}?hash={digest[:32].upper()}"
        }
    return {"paths": paths}


_QUERY = [
    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
    {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
    {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
]


def openapi_v3_document_at(path: str, resources: Iterable[Resource]) -> Obj | None:
    """The document ``openapi_v3_index`` lists under ``path`` (None: no such path)."""
    for (group, version), served in group_versions(resources).items():
        if path == _path(group, version):
            return openapi_v3_document(served)
    return None


def openapi_v3_document(served: Iterable[Resource]) -> Obj:
    """The OpenAPI v3 document of one group version: each resource's item path with its
    operations, marked with the kind they serve."""
    paths: Obj = {}
    for r in served:
        gvk = {"group": r.group, "version": r.version, "kind": r.kind}
        base = "/" + _path(r.group, r.version)
        item = (
            f"{base}/namespaces/{{namespace}}/{r.plural}/{{name}}"
            if r.namespaced
            else f"{base}/{r.plural}/{{name}}"
        )
        collection = item.rsplit("/", 1)[0]
        operation = {
            "x-kubernetes-group-version-kind": gvk,
            "parameters": _QUERY,
            "responses": {"200": {"description": "OK"}},
        }
        paths[item] = {verb: dict(operation) for verb in ("get", "put", "patch", "delete")}
        paths[collection] = {verb: dict(operation) for verb in ("get", "post")}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.31.0-fake"},
        "paths": paths,
        "components": {"schemas": {}},
    }
