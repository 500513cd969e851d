"""The fields of a Pod object the node processes use, validated at the edge.

A watch or list hands over plain JSON. Everything deeper works on :class:`PodObject`, so
no ``.get`` can ever meet a string where an object was expected: a Pod whose fields have
the wrong shapes is refused here with a bounded reason (:class:`PodError`), and the
caller keeps what it had.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.echo import bounded


class PodError(ValueError):
    """A Pod object that cannot be used; ``reason`` is bounded."""

    def __init__(self, reason: str, *, namespace: str = "", name: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.namespace = namespace
        self.name = name


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class _Meta(_Lenient):
    name: str = Field(min_length=1, max_length=253)
    namespace: str = Field(min_length=1, max_length=63)
    uid: str = Field(default="", max_length=128)
    deletion_timestamp: str | None = Field(default=None, alias="deletionTimestamp")
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels", mode="before")
    @classmethod
    def _no_labels(cls, value: object) -> object:
        return {} if value is None else value


class _Spec(_Lenient):
    host_network: bool = Field(default=False, alias="hostNetwork")


class _PodIP(_Lenient):
    ip: str = Field(max_length=64)


class _Status(_Lenient):
    phase: str = Field(default="", max_length=32)
    pod_ip: str | None = Field(default=None, max_length=64, alias="podIP")
    pod_ips: list[_PodIP] = Field(default_factory=list, max_length=8, alias="podIPs")


class PodObject(_Lenient):
    metadata: _Meta
    spec: _Spec = _Spec()
    status: _Status = _Status()

    def addresses(self) -> tuple[tuple[str, ...], list[str]]:
        """(valid addresses, invalid ones bounded): podIPs, else podIP."""
        raw = [p.ip for p in self.status.pod_ips]
        if not raw and self.status.pod_ip:
            raw = [self.status.pod_ip]
        valid, invalid = [], []
        for ip in raw:
            try:
                valid.append(str(ipaddress.ip_address(ip)))
            except ValueError:
                invalid.append(bounded(ip))
        return tuple(valid), invalid


def parse_pod(obj: Any) -> PodObject:
    """The validated Pod, or :class:`PodError` naming the first problem."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    ns = meta.get("namespace") if isinstance(meta, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    where = {
        "namespace": ns[:63] if isinstance(ns, str) else "",
        "name": name[:253] if isinstance(name, str) else "",
    }
    try:
        return PodObject.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise PodError(f"{loc}: {bounded(err['msg'])}", **where) from None


def pod_key(obj: Any) -> tuple[str, str] | None:
    """(namespace, name) of an object, when those two are strings (for a delete)."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return None
    ns, name = meta.get("namespace"), meta.get("name")
    return (ns, name) if isinstance(ns, str) and isinstance(name, str) and ns and name else None
