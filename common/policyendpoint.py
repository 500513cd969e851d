"""PolicyEndpoint (``networking.k8s.aws/v1alpha1``): the controller -> node agent contract.

Pydantic models that accept exactly what the reference controller writes and reject,
with a message naming the field, what the datapath could not enforce faithfully: bad
CIDRs or excepts, ports out of range, unknown protocols, ``endPort`` below ``port``.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.cidr import Cidr
from common.cidr import parse as fast_cidr
from common.dnsnames import DOMAIN_NAME
from common.echo import ECHO_LIMIT, bounded, cut

API_VERSION = "networking.k8s.aws/v1alpha1"
KIND = "PolicyEndpoint"
TRIGGER_ANNOTATION = "networking.k8s.aws/last-change-trigger-time"
# The target group of an object within its policy, written by np-resolver where ingress
# named ports resolve differently on different targets (see resolver.layout); agents
# join objects by (namespace, policyRef.name, group). Absent: the one group.
GROUP_ANNOTATION = "np-resolver.networking.k8s.aws/target-group"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)


def _none_to_list(value: Any) -> Any:
    return [] if value is None else value


def _none_to_dict(value: Any) -> Any:
    return {} if value is None else value


class PortSpec(NamedTuple):
    protocol: str  # TCP | UDP | SCTP
    port: int | None  # None: every port of the protocol
    end_port: int | None


class DomainRule(NamedTuple):
    """One validated ``domainName`` egress entry: peers learned under a matching name
    (common.dnsnames) may use ``ports`` (empty: every port of every protocol)."""

    pattern: str  # as written; matched case-insensitively, without the trailing dot
    ports: tuple[PortSpec, ...]


def parse_domains(entries: Any, where: str) -> list[DomainRule]:
    """The ``domainName`` entries of an egress list (the others: parse_rule)."""
    out = []
    for i, entry in enumerate(entries or []):
        if not isinstance(entry, dict) or entry.get("cidr") or not entry.get("domainName"):
            continue
        loc = f"{where}.{i}"
        name = entry["domainName"]
        if not isinstance(name, str) or not DOMAIN_NAME.match(name):
            raise ValueError(
                f"{loc}.domainName: {bounded(name)} is not a domain name "
                "(a leading '*.' is the only wildcard)"
            )
        ports = entry.get("ports")
        out.append(DomainRule(name, parse_ports(ports, f"{loc}.ports") if ports else ()))
    return out


class Rule(NamedTuple):
    """One validated ``ingress``/``egress`` entry (an ipBlock or a peer pod's IP)."""

    cidr: Cidr
    excepts: tuple[Cidr, ...]
    ports: tuple[PortSpec, ...]  # empty: every port of every protocol


# The rule entries are validated by hand, not by pydantic models: a node may read hundreds
# of thousands of them, and a model per entry costs about 6 us where this costs 2 (and
# agent.rulepack's path for the common entries less again).
def parse_rule(entry: Any, loc: str) -> Rule | None:
    """One ``ingress``/``egress`` entry at ``loc`` (``spec.ingress.3``); ValueError
    ``"<loc>[.field]: <problem>"``. None for an FQDN entry (``domainName`` without
    ``cidr``): not enforced on the NetworkPolicy path."""
    if not isinstance(entry, dict):
        raise ValueError(f"{loc}: must be an object")
    cidr = entry_cidr(entry, loc)
    if cidr is None:
        return None
    excepts = _excepts(entry.get("except"), cidr, entry["cidr"], loc)
    ports = entry.get("ports")
    return Rule(cidr, excepts, parse_ports(ports, f"{loc}.ports") if ports else ())


def entry_cidr(entry: dict[str, Any], loc: str) -> Cidr | None:
    """An entry's ``cidr``; None for an FQDN entry (``domainName``, no cidr)."""
    text = entry.get("cidr")
    if text is None or (isinstance(text, str) and not text.strip()):
        if entry.get("domainName"):
            return None
        raise ValueError(f"{loc}: cidr is required")
    try:
        return fast_cidr(text)
    except ValueError as exc:
        raise ValueError(f"{loc}.cidr: {exc}") from None


def _excepts(raw_excepts: Any, cidr: Cidr, text: Any, loc: str) -> tuple[Cidr, ...]:
    """An entry's except blocks: each of the cidr's family and inside it."""
    if not raw_excepts:
        return ()
    if not isinstance(raw_excepts, list):
        raise ValueError(f"{loc}.except: must be a list")
    parsed = []
    for raw in raw_excepts:
        try:
            ex = fast_cidr(raw)
        except ValueError as exc:
            raise ValueError(f"{loc}.except: {exc}") from None
        if ex.version != cidr.version:
            raise ValueError(
                f"{loc}.except: {bounded(raw)} is not of the family of cidr {bounded(text)}"
            )
        if not cidr.contains(ex):
            raise ValueError(f"{loc}.except: {bounded(raw)} is outside cidr {bounded(text)}")
        parsed.append(ex)
    return tuple(parsed)


def parse_ports(ports: Any, where: str) -> tuple[PortSpec, ...]:
    """An entry's ``ports`` list at ``where`` (``spec.ingress.3.ports``)."""
    if not isinstance(ports, list):
        raise ValueError(f"{where}: must be a list")
    out = []
    for i, p in enumerate(ports):
        loc = f"{where}.{i}"
        if not isinstance(p, dict):
            raise ValueError(f"{loc}: must be an object")
        protocol = p.get("protocol") or "TCP"
        if protocol not in ("TCP", "UDP", "SCTP"):
            raise ValueError(f"{loc}.protocol: {bounded(protocol)} is not TCP, UDP or SCTP")
        port = _port_number(p.get("port"), f"{loc}.port")
        end = _port_number(p.get("endPort"), f"{loc}.endPort")
        if end is not None:
            if port is None:
                raise ValueError(f"{loc}: endPort without port")
            if end < port:
                raise ValueError(f"{loc}: endPort {end} < port {port}")
        out.append(PortSpec(protocol, port, end))
    return tuple(out)


def _port_number(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.isascii() or not value.isdigit():
            raise ValueError(f"{where}: named port {bounded(value)} must be resolved to a number")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {bounded(value)} is not a port number")
    if not 1 <= value <= 65535:
        raise ValueError(f"{where}: {value} is outside 1-65535")
    return value


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
                raise ValueError(f"invalid IP {bounded(value)}") from exc
        return value


class PolicyReference(_Model):
    name: str
    namespace: str | None = None


class PolicyEndpointSpec(_Model):
    policy_ref: PolicyReference = Field(alias="policyRef")
    pod_selector: dict[str, Any] | None = Field(default=None, alias="podSelector")
    pod_isolation: list[Literal["Ingress", "Egress"]] = Field(
        default_factory=list, alias="podIsolation"
    )
    pod_selector_endpoints: list[PodEndpoint] = Field(
        default_factory=list, alias="podSelectorEndpoints"
    )
    # raw entries: validated entry by entry (parse_rule; agent.rulepack)
    ingress: list[Any] = Field(default_factory=list)
    egress: list[Any] = Field(default_factory=list)

    _none = field_validator(
        "pod_isolation", "pod_selector_endpoints", "ingress", "egress", mode="before"
    )(_none_to_list)


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


class PolicyEndpointError(ValueError):
    """A PolicyEndpoint the agent must not enforce; ``reason`` is one line."""

    def __init__(self, namespace: str, name: str, reason: str) -> None:
        reason = cut(reason, 4 * ECHO_LIMIT)  # what it quotes is bounded, and so is it
        super().__init__(f"{namespace}/{name}: {reason}")
        self.namespace = namespace
        self.name = name
        self.reason = reason


def parse_model(obj: dict[str, Any]) -> PolicyEndpoint:
    """The object with its rule entries left raw (``spec.ingress``/``spec.egress``:
    parse_rule validates each, through agent.rulepack)."""
    try:
        return PolicyEndpoint.model_validate(obj)
    except ValidationError as exc:
        meta = obj.get("metadata") or {}
        raise PolicyEndpointError(
            meta.get("namespace", "?"), meta.get("name", "?"), describe(exc)
        ) from None


def describe(exc: ValidationError) -> str:
    """First validation problem as ``field.path: message`` (plus how many more)."""
    errors = exc.errors()
    first = errors[0]
    path = ".".join(str(p) for p in first["loc"]) or "object"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: {msg}{more}"
