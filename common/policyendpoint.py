"""PolicyEndpoint (``networking.k8s.aws/v1alpha1``): the controller -> node agent contract.

Pydantic models that accept exactly what the reference controller writes and reject,
with a message naming the field, what the datapath could not enforce faithfully: bad
CIDRs or excepts, ports out of range, unknown protocols, ``endPort`` below ``port``.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

API_VERSION = "networking.k8s.aws/v1alpha1"
KIND = "PolicyEndpoint"
TRIGGER_ANNOTATION = "networking.k8s.aws/last-change-trigger-time"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


def _none_to_list(value: Any) -> Any:
    return [] if value is None else value


def _none_to_dict(value: Any) -> Any:
    return {} if value is None else value


def parse_cidr(value: str) -> Network:
    """A CIDR, or a bare IP (pod peers) as a host prefix; host bits are cleared."""
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"invalid CIDR {value!r}") from exc


class Port(_Model):
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    port: int | None = Field(default=None, ge=1, le=65535)
    end_port: int | None = Field(default=None, alias="endPort", ge=1, le=65535)

    @field_validator("protocol", mode="before")
    @classmethod
    def _default_protocol(cls, value: Any) -> Any:
        return "TCP" if value is None else value

    @field_validator("port", "end_port", mode="before")
    @classmethod
    def _numeric(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.isdigit():
            raise ValueError(f"named port {value!r} must be resolved to a number")
        return value

    @model_validator(mode="after")
    def _range(self) -> Port:
        if self.end_port is not None:
            if self.port is None:
                raise ValueError("endPort without port")
            if self.end_port < self.port:
                raise ValueError(f"endPort {self.end_port} < port {self.port}")
        return self


class EndpointInfo(_Model):
    cidr: str | None = None
    except_: list[str] = Field(default_factory=list, alias="except")
    ports: list[Port] | None = None
    domain_name: str | None = Field(default=None, alias="domainName")

    _none = field_validator("except_", mode="before")(_none_to_list)

    @model_validator(mode="after")
    def _networks(self) -> EndpointInfo:
        if self.cidr is None or not self.cidr.strip():
            if self.domain_name:
                return self  # FQDN rule: not enforced on the NetworkPolicy path
            raise ValueError("cidr is required")
        cidr = parse_cidr(self.cidr)
        for raw in self.except_:
            ex = parse_cidr(raw)
            if ex.version != cidr.version:
                raise ValueError(f"except {raw!r} is not of the family of cidr {self.cidr!r}")
            if not ex.subnet_of(cidr):  # type: ignore[arg-type]
                raise ValueError(f"except {raw!r} is outside cidr {self.cidr!r}")
        return self

    @property
    def network(self) -> Network | None:
        return parse_cidr(self.cidr) if self.cidr else None

    @property
    def excepts(self) -> list[Network]:
        return [parse_cidr(e) for e in self.except_]


class PodEndpoint(_Model):
    host_ip: str | None = Field(default=None, alias="hostIP")
    pod_ip: str = Field(alias="podIP")
    name: str
    namespace: str

    @field_validator("pod_ip", "host_ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        if value:
            try:
                ipaddress.ip_address(value)
            except ValueError as exc:
                raise ValueError(f"invalid IP {value!r}") from exc
        return value


class PolicyReference(_Model):
    name: str
    namespace: str | None = None


class PolicyEndpointSpec(_Model):
    policy_ref: PolicyReference = Field(alias="policyRef")
    pod_selector: dict[str, Any] | None = Field(default=None, alias="podSelector")
    pod_isolation: list[Literal["Ingress", "Egress"]] = Field(default_factory=list,
                                                              alias="podIsolation")
    pod_selector_endpoints: list[PodEndpoint] = Field(default_factory=list,
                                                      alias="podSelectorEndpoints")
    ingress: list[EndpointInfo] = Field(default_factory=list)
    egress: list[EndpointInfo] = Field(default_factory=list)

    _none = field_validator("pod_isolation", "pod_selector_endpoints", "ingress", "egress",
                            mode="before")(_none_to_list)


class ObjectMeta(_Model):
    name: str = ""
    namespace: str = ""
    generate_name: str | None = Field(default=None, alias="generateName")
    uid: str = ""
    generation: int = 0
    resource_version: str = Field(default="", alias="resourceVersion")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    owner_references: list[dict[str, Any]] = Field(default_factory=list, alias="ownerReferences")

    _dicts = field_validator("labels", "annotations", mode="before")(_none_to_dict)
    _lists = field_validator("owner_references", mode="before")(_none_to_list)


class PolicyEndpoint(_Model):
    api_version: str = Field(default=API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: ObjectMeta
    spec: PolicyEndpointSpec

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class PolicyEndpointError(ValueError):
    """A PolicyEndpoint the agent must not enforce; ``reason`` is one line."""

    def __init__(self, namespace: str, name: str, reason: str) -> None:
        super().__init__(f"{namespace}/{name}: {reason}")
        self.namespace = namespace
        self.name = name
        self.reason = reason


def parse(obj: dict[str, Any]) -> PolicyEndpoint:
    """Validate a PolicyEndpoint as read from the API; raises PolicyEndpointError."""
    meta = obj.get("metadata") or {}
    try:
        return PolicyEndpoint.model_validate(obj)
    except ValidationError as exc:
        raise PolicyEndpointError(meta.get("namespace", "?"), meta.get("name", "?"),
                                    describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """First validation problem as ``field.path: message`` (plus how many more)."""
    errors = exc.errors()
    first = errors[0]
    path = ".".join(str(p) for p in first["loc"]) or "object"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: {msg}{more}"
