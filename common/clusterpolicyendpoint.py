"""ClusterPolicyEndpoint (``networking.k8s.aws/v1alpha1``, cluster-scoped): what the
controller (or np-resolver) resolves a ClusterNetworkPolicy into for the node agents.

Validated by hand like PolicyEndpoint entries (common.policyendpoint): a message naming
the first offending field, for anything the datapath could not enforce faithfully
(unknown tier or action, priority outside 0-1000, bad CIDRs or ports). ``domainName``
entries (no ``cidr``) are not address rules and are skipped here.
"""

from __future__ import annotations

import ipaddress
from typing import Any, NamedTuple

from common.cidr import Cidr
from common.echo import bounded
from common.policyendpoint import (
    DomainRule,
    PolicyEndpointError,
    PortSpec,
    entry_cidr,
    parse_domains,
    parse_ports,
)

KIND = "ClusterPolicyEndpoint"
POLICY_KIND = "ClusterNetworkPolicy"
TIERS = ("Admin", "Baseline")
ACTIONS = ("Accept", "Deny", "Pass")
MAX_PRIORITY = 1000


class ClusterEntry(NamedTuple):
    cidr: Cidr
    ports: tuple[PortSpec, ...]  # empty: all traffic
    action: str  # Accept | Deny | Pass


class ClusterPod(NamedTuple):
    namespace: str
    name: str
    pod_ip: str  # canonical text
    host_ip: str  # canonical text, "" if absent


class ClusterPolicyEndpoint(NamedTuple):
    name: str
    uid: str
    generation: int
    annotations: dict[str, str]
    policy: str  # spec.policyRef.name
    tier: str
    priority: int
    pods: tuple[ClusterPod, ...]
    ingress: tuple[ClusterEntry, ...]
    egress: tuple[ClusterEntry, ...]
    domains: tuple[DomainRule, ...]  # egress Accept entries by domain name


def _address(value: Any, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except (ValueError, TypeError):
        raise ValueError(f"{where}: invalid IP {bounded(value)}") from None


def _entries(raw: Any, where: str) -> tuple[list[ClusterEntry], list[DomainRule]]:
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        raise ValueError(f"{where}: must be a list")
    out: list[ClusterEntry] = []
    domains = parse_domains(raw, where)
    for i, entry in enumerate(raw):
        loc = f"{where}.{i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{loc}: must be an object")
        action = entry.get("action")
        if action not in ACTIONS:
            raise ValueError(f"{loc}.action: {bounded(action)} is not Accept, Deny or Pass")
        cidr = entry_cidr(entry, loc)
        if cidr is None:
            if action != "Accept":
                raise ValueError(f"{loc}.action: a domainName entry must be Accept")
            continue
        ports = entry.get("ports")
        out.append(ClusterEntry(cidr, parse_ports(ports, f"{loc}.ports") if ports else (), action))
    return out, domains


def parse(obj: dict[str, Any]) -> ClusterPolicyEndpoint:
    """Validate a ClusterPolicyEndpoint; PolicyEndpointError (namespace "") naming the
    first offending field."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", "?"))
    try:
        return _parse(obj, meta)
    except ValueError as exc:
        raise PolicyEndpointError("", name, str(exc)) from None


def _parse(obj: dict[str, Any], meta: dict[str, Any]) -> ClusterPolicyEndpoint:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise ValueError("spec: must be an object")
    ref = spec.get("policyRef")
    if not isinstance(ref, dict) or not isinstance(ref.get("name"), str) or not ref["name"]:
        raise ValueError("spec.policyRef.name: required")
    tier = spec.get("tier")
    if tier not in TIERS:
        raise ValueError(f"spec.tier: {bounded(tier)} is not Admin or Baseline")
    priority = spec.get("priority")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"spec.priority: {bounded(priority)} is not an integer")
    if not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"spec.priority: {priority} is outside 0-{MAX_PRIORITY}")
    raw_pods = spec.get("podSelectorEndpoints") or []
    if not isinstance(raw_pods, list):
        raise ValueError("spec.podSelectorEndpoints: must be a list")
    pods = []
    for i, p in enumerate(raw_pods):
        loc = f"spec.podSelectorEndpoints.{i}"
        if not isinstance(p, dict):
            raise ValueError(f"{loc}: must be an object")
        for field in ("name", "namespace"):
            if not isinstance(p.get(field), str) or not p[field]:
                raise ValueError(f"{loc}.{field}: required")
        host = p.get("hostIP")
        pods.append(
            ClusterPod(
                p["namespace"],
                p["name"],
                _address(p.get("podIP"), f"{loc}.podIP"),
                _address(host, f"{loc}.hostIP") if host else "",
            )
        )
    ingress, ingress_domains = _entries(spec.get("ingress"), "spec.ingress")
    if ingress_domains:
        raise ValueError("spec.ingress: domainName entries are egress only")
    egress, domains = _entries(spec.get("egress"), "spec.egress")
    annotations = meta.get("annotations") or {}
    return ClusterPolicyEndpoint(
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        generation=_int(meta.get("generation")),
        annotations=dict(annotations) if isinstance(annotations, dict) else {},
        policy=ref["name"],
        tier=tier,
        priority=priority,
        pods=tuple(pods),
        ingress=tuple(ingress),
        egress=tuple(egress),
        domains=tuple(domains),
    )


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
