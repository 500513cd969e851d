"""The API server's validation of what a client writes (``FakeKube(admission=True)``), for
the kinds a user writes by hand: object names, the policy kinds' specs (the same rules
np-resolver applies, from :mod:`resolver.validate` and :mod:`resolver.cluster`), and,
with ``fieldValidation=Strict`` (kubectl's default), unknown fields (top-level ones of
every kind; all of them where :mod:`fakekube.schemas` has the kind's schema).

A refusal is a ``Status`` as the real server sends it: 422 Invalid with the offending
field in ``details.causes`` (kubectl prints ``The NetworkPolicy "x" is invalid: ...``),
or 400 BadRequest for a strict decoding error.
"""

from __future__ import annotations

import re
from typing import Any

from fakekube import store as fs
from fakekube.schemas import schema_for, unknown_fields
from fakekube.store import ApiError
from resolver.cluster import validate_cluster_spec
from resolver.validate import InvalidPolicy, validate_spec

Obj = dict[str, Any]
# an RFC 1123 subdomain: what every name served here must be
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec", "status"}
_EVENT_FIELDS = {
    "involvedObject", "reason", "message", "source", "firstTimestamp", "lastTimestamp",
    "count", "type", "eventTime", "series", "action", "related", "reportingComponent",
    "reportingInstance",
}  # fmt: skip


def invalid(resource: fs.Resource, name: str, causes: list[tuple[str, str]]) -> ApiError:
    """422 Invalid naming each (field, problem)."""
    what = f"{resource.kind}.{resource.group}" if resource.group else resource.kind
    listed = "; ".join(f"{field}: {problem}" for field, problem in causes)
    return ApiError(
        422,
        "Invalid",
        f'{what} "{name}" is invalid: {listed}',
        details={
            "name": name,
            "group": resource.group,
            "kind": resource.kind,
            "causes": [
                {"reason": "FieldValueInvalid", "message": problem, "field": field}
                for field, problem in causes
            ],
        },
    )


def admit(resource: fs.Resource, obj: Obj, *, strict: bool) -> None:
    """Raise the ApiError the API server would answer ``obj`` with, if any."""
    meta = obj.get("metadata")
    name = str(meta.get("name") or "") if isinstance(meta, dict) else ""
    if strict:
        allowed = _TOP_LEVEL | (_EVENT_FIELDS if resource == fs.EVENTS else set())
        unknown = sorted(k for k in obj if k not in allowed)
        schema = schema_for(resource)
        if schema is not None:
            unknown += unknown_fields({k: v for k, v in obj.items() if k in allowed}, schema)
        if unknown:
            raise ApiError(
                400,
                "BadRequest",
                "strict decoding error: " + ", ".join(f'unknown field "{k}"' for k in unknown),
            )
    if name and (len(name) > 253 or not _SUBDOMAIN.match(name)):
        raise invalid(
            resource,
            name,
            [
                (
                    "metadata.name",
                    f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist '
                    "of lower case alphanumeric characters, '-' or '.', and must start and "
                    "end with an alphanumeric character",
                )
            ],
        )
    try:
        if resource == fs.NETWORK_POLICIES:
            validate_spec(obj.get("spec"))
        elif resource == fs.APPLICATION_NETWORK_POLICIES:
            validate_spec(obj.get("spec"), application=True)
        elif resource == fs.CLUSTER_NETWORK_POLICIES:
            validate_cluster_spec(obj.get("spec"))
    except InvalidPolicy as exc:
        field, _, problem = str(exc).partition(": ")
        raise invalid(resource, name, [(field, f"Invalid value: {problem or 'invalid'}")]) from None
