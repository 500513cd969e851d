"""NetworkPolicy -> PolicyEndpoint contents, the way the reference controller resolves them,
and better where it is wrong (pure; no API access).

- Targets: ready pods (an IP, not Succeeded/Failed, not hostNetwork) of the policy's
  namespace matching ``podSelector``.
- Peers: ``ipBlock`` copied with its ``except``; pod/namespace selectors become the bare
  IPs of matching ready pods, every address of dual-stack pods (a nil namespaceSelector
  means the policy's namespace); a rule without peers allows ``0.0.0.0/0`` and ``::/0``.
- Egress selector peers also add the ClusterIPs of Services whose selector the peer's
  podSelector matches, with the Service's port numbers (policies see traffic before
  kube-proxy's DNAT).
- Named ports: ingress resolves them on each target pod (targets resolving differently
  form separate target groups, see ``resolver.layout``, so the union stays exact);
  egress resolves them on each destination pod, also for rules without ``to`` (the
  reference controller drops those). A rule whose named ports resolve to nothing allows
  nothing.
- ApplicationNetworkPolicies (``networking.k8s.aws``) resolve the same way; their egress
  ``domainNames`` peers become ``domainName`` entries with the rule's ports, and a rule
  without ``to`` allows every destination (the controller drops such rules).
- How the result is laid out into objects (chunks, layouts): ``resolver.layout``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.selectors import compile_selector
from resolver.layout import Group, Resolution, paired
from resolver.validate import InvalidPolicy, validate_spec

APPLICATION_KIND = "ApplicationNetworkPolicy"
MAX_ENTRIES = 200  # entries (and pods) per object: the controller's --endpoint-chunk-size
ALL_V4, ALL_V6 = "0.0.0.0/0", "::/0"

Obj = dict[str, Any]
Entry = dict[str, Any]  # {"cidr", "except"?, "ports"?}


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str]
    ips: tuple[str, ...]
    host_ip: str
    ready: bool
    host_network: bool
    ports: tuple[tuple[str, str, int], ...]  # (name, protocol, containerPort)

    def named(self, name: str, protocol: str) -> int | None:
        for n, proto, number in self.ports:
            if n == name and proto == protocol:
                return number
        return None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]
    selector: Mapping[str, str]
    ports: tuple[tuple[str, int, int | str], ...]  # (protocol, port, targetPort)


@dataclass
class World:
    pods: dict[tuple[str, str], Pod] = field(default_factory=dict)
    namespaces: dict[str, Mapping[str, str]] = field(default_factory=dict)
    services: dict[tuple[str, str], Service] = field(default_factory=dict)


def pod_from(obj: Obj) -> Pod:
    meta, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
    ips = tuple(p["ip"] for p in status.get("podIPs") or [] if p.get("ip")) or (
        (status["podIP"],) if status.get("podIP") else ()
    )
    ports = tuple(
        (p["name"], p.get("protocol") or "TCP", int(p["containerPort"]))
        for c in spec.get("containers") or []
        for p in c.get("ports") or []
        if p.get("name")
    )
    return Pod(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        labels=dict(meta.get("labels") or {}),
        ips=ips,
        host_ip=status.get("hostIP", ""),
        ready=bool(ips) and status.get("phase") not in ("Succeeded", "Failed"),
        host_network=bool(spec.get("hostNetwork")),
        ports=ports,
    )


def service_from(obj: Obj) -> Service:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    ips = tuple(
        ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip and ip != "None"
    )
    ports = tuple(
        (p.get("protocol") or "TCP", int(p["port"]), p.get("targetPort", p["port"]))
        for p in spec.get("ports") or []
    )
    return Service(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        cluster_ips=ips,
        selector=dict(spec.get("selector") or {}),
        ports=ports,
    )


def policy_types(spec: Mapping[str, Any]) -> list[str]:
    """API defaulting: Ingress always, Egress when the policy has egress rules."""
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress", *(["Egress"] if spec.get("egress") else [])]


# ---- peers and ports -------------------------------------------------------------------
def _peer_namespaces(world: World, namespace: str, peer: Mapping[str, Any]) -> set[str]:
    """The namespaces a peer's namespaceSelector picks (none given: the policy's own)."""
    ns_sel = peer.get("namespaceSelector")
    if ns_sel is None:
        return {namespace}
    match_ns = compile_selector(ns_sel)
    return {n for n, labels in world.namespaces.items() if match_ns(labels)}


def _peers(world: World, namespace: str, peer: Mapping[str, Any]) -> list[Pod]:
    pod_sel = peer.get("podSelector")
    namespaces = _peer_namespaces(world, namespace, peer)
    match_pod = compile_selector(pod_sel if pod_sel is not None else {})
    return [
        p
        for p in world.pods.values()
        if p.namespace in namespaces and p.ready and not p.host_network and match_pod(p.labels)
    ]


def _port(p: Mapping[str, Any], *, on: Pod | None) -> dict[str, Any] | None:
    """One rule port as a PolicyEndpoint port; a named port resolved on ``on``
    (None: unresolvable)."""
    protocol = p.get("protocol") or "TCP"
    value = p.get("port")
    if value is None:
        return {"protocol": protocol}
    if isinstance(value, str) and not value.isdigit():
        number = on.named(value, protocol) if on is not None else None
        return None if number is None else {"protocol": protocol, "port": number}
    out: dict[str, Any] = {"protocol": protocol, "port": int(value)}
    if p.get("endPort") is not None:
        out["endPort"] = int(p["endPort"])
    return out


def _ports(
    rule_ports: Sequence[Mapping[str, Any]] | None, *, on: Pod | None
) -> list[dict[str, Any]] | None:
    """Resolved ports of a rule: [] means every port; None means the rule has ports and
    none of them apply (the rule allows nothing here)."""
    if not rule_ports:
        return []
    resolved = [r for r in (_port(p, on=on) for p in rule_ports) if r is not None]
    return _dedupe(resolved) or None


def _has_named(rule_ports: Sequence[Mapping[str, Any]] | None) -> bool:
    return any(
        isinstance(p.get("port"), str) and not str(p.get("port")).isdigit()
        for p in rule_ports or []
    )


def _entry(cidr: str, ports: list[dict[str, Any]], excepts: Iterable[str] = ()) -> Entry:
    e: Entry = {"cidr": cidr}
    if excepts:
        e["except"] = sorted(excepts)
    if ports:
        e["ports"] = ports
    return e


# ---- rules ------------------------------------------------------------------------------
def _ingress(
    world: World, namespace: str, rules: Sequence[Mapping[str, Any]], target: Pod
) -> list[Entry]:
    entries: list[Entry] = []
    for rule in rules:
        ports = _ports(rule.get("ports"), on=target)
        if ports is None:
            continue
        peers = rule.get("from") or []
        if not peers:
            entries += [_entry(ALL_V4, ports), _entry(ALL_V6, ports)]
            continue
        for peer in peers:
            block = peer.get("ipBlock")
            if block:
                entries.append(_entry(block["cidr"], ports, block.get("except") or ()))
                continue
            for pod in _peers(world, namespace, peer):
                entries += [_entry(ip, ports) for ip in pod.ips]
    return _dedupe(entries)


def _egress(world: World, namespace: str, rules: Sequence[Mapping[str, Any]]) -> list[Entry]:
    entries: list[Entry] = []
    for rule in rules:
        rule_ports = rule.get("ports")
        peers = rule.get("to") or []
        if not peers:
            entries += _egress_anywhere(world, rule_ports)
            continue
        for peer in peers:
            entries += _egress_peer(world, namespace, peer, rule_ports)
    return _dedupe(entries)


def _egress_anywhere(world: World, rule_ports: Sequence[Mapping[str, Any]] | None) -> list[Entry]:
    """A rule without peers: every address on its numeric ports, and each pod of the
    cluster on what its named ports resolve to there."""
    numeric = [p for p in rule_ports or [] if not _has_named([p])]
    entries: list[Entry] = []
    if not rule_ports or numeric:
        ports = _ports(numeric, on=None) if numeric else []
        entries += [_entry(ALL_V4, ports or []), _entry(ALL_V6, ports or [])]
    if _has_named(rule_ports):
        named = [p for p in rule_ports or [] if _has_named([p])]
        for pod in world.pods.values():
            if pod.ready and not pod.host_network:
                resolved = _ports(named, on=pod)
                if resolved:
                    entries += [_entry(ip, resolved) for ip in pod.ips]
    return entries


def _domain_entries(
    names: Sequence[str], rule_ports: Sequence[Mapping[str, Any]] | None
) -> list[Entry]:
    """An ApplicationNetworkPolicy ``domainNames`` peer: a ``domainName`` entry per name
    with the rule's ports, as the controller writes them (a named port: every port of its
    protocol, as AWS enforces it)."""
    ports = []
    for p in rule_ports or []:
        protocol = p.get("protocol") or "TCP"
        value = p.get("port")
        if value is None or (isinstance(value, str) and not value.isdigit()):
            ports.append({"protocol": protocol})
            continue
        port: dict[str, Any] = {"protocol": protocol, "port": int(value)}
        if p.get("endPort") is not None:
            port["endPort"] = int(p["endPort"])
        ports.append(port)
    return [{"domainName": name, **({"ports": _dedupe(ports)} if ports else {})} for name in names]


def _egress_peer(
    world: World,
    namespace: str,
    peer: Mapping[str, Any],
    rule_ports: Sequence[Mapping[str, Any]] | None,
) -> list[Entry]:
    if peer.get("domainNames") is not None:
        return _domain_entries(peer["domainNames"], rule_ports)
    block = peer.get("ipBlock")
    entries: list[Entry] = []
    if block:
        numeric = [p for p in rule_ports or [] if not _has_named([p])]
        if not rule_ports or numeric:
            entries.append(
                _entry(block["cidr"], _ports(numeric, on=None) or [], block.get("except") or ())
            )
        if _has_named(rule_ports):
            entries += _named_in_block(world, block, rule_ports or [])
        return entries
    for pod in _peers(world, namespace, peer):
        resolved = _ports(rule_ports, on=pod)
        if resolved is not None:
            entries += [_entry(ip, resolved) for ip in pod.ips]
    if peer.get("podSelector") is not None:
        entries += _service_entries(world, namespace, peer, rule_ports)
    return entries


def _named_in_block(
    world: World, block: Mapping[str, Any], rule_ports: Sequence[Mapping[str, Any]]
) -> list[Entry]:
    cidr = ipaddress.ip_network(block["cidr"], strict=False)
    excepts = [ipaddress.ip_network(e, strict=False) for e in block.get("except") or []]
    out: list[Entry] = []
    for pod in world.pods.values():
        if not pod.ready or pod.host_network:
            continue
        for ip in pod.ips:
            addr = ipaddress.ip_address(ip)
            if addr.version != cidr.version or addr not in cidr:
                continue
            if any(addr.version == e.version and addr in e for e in excepts):
                continue
            resolved = _ports([p for p in rule_ports if _has_named([p])], on=pod)
            if resolved:
                out.append(_entry(ip, resolved))
    return out


def _service_entries(
    world: World,
    namespace: str,
    peer: Mapping[str, Any],
    rule_ports: Sequence[Mapping[str, Any]] | None,
) -> list[Entry]:
    namespaces = _peer_namespaces(world, namespace, peer)
    matches = compile_selector(peer.get("podSelector"))
    out: list[Entry] = []
    for svc in world.services.values():
        if svc.namespace not in namespaces or not svc.selector or not svc.cluster_ips:
            continue
        if not matches(svc.selector):
            continue
        if not rule_ports:
            ports: list[dict[str, Any]] = []
        else:
            ports = [
                {"protocol": proto, "port": port}
                for proto, port, target in svc.ports
                if any(_service_port_matches(p, proto, port, target) for p in rule_ports)
            ]
            if not ports:
                continue
        out += [_entry(ip, _dedupe(ports)) for ip in svc.cluster_ips]
    return out


def _service_port_matches(p: Mapping[str, Any], proto: str, port: int, target: int | str) -> bool:
    if (p.get("protocol") or "TCP") != proto:
        return False
    want = p.get("port")
    if want is None:
        return True
    if isinstance(want, str) and not want.isdigit():
        return target == want
    if not isinstance(target, int):
        return False
    end = p.get("endPort") or int(want)
    return int(want) <= target <= int(end)


def _dedupe(items: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for item in items:
        seen.setdefault(repr(sorted(item.items())), item)
    return [seen[k] for k in sorted(seen)]


# ---- the policy --------------------------------------------------------------------------
def resolve(policy: Mapping[str, Any], world: World, chunk_size: int = MAX_ENTRIES) -> list[Obj]:
    """The specs of a NetworkPolicy's PolicyEndpoints in the paired layout (ordered,
    deterministic); InvalidPolicy if its content is malformed."""
    return [d.spec for d in paired(resolution(policy, world), chunk_size)]


def resolution(policy: Mapping[str, Any], world: World) -> Resolution:
    """What a NetworkPolicy resolves to, before it is laid out into objects;
    InvalidPolicy if its content is malformed (bad CIDR, selector or port, wrong type)."""
    meta = policy.get("metadata") or {} if isinstance(policy, Mapping) else {}
    where = f"{meta.get('namespace', '?')}/{meta.get('name', '?')}"
    return checked(f"networkpolicy {where}", lambda: _resolve(policy, world))


def checked(what: str, build: Callable[[], Resolution]) -> Resolution:
    """A resolution whose InvalidPolicy names the policy (``what``). Validation comes
    first in ``build``: anything raised past it is a resolver bug, and surfaces as one
    (never as "bad input"); the result must be JSON (what is written)."""
    try:
        res = build()
    except InvalidPolicy as exc:
        raise InvalidPolicy(f"{what}: {exc}") from None
    json.dumps([res.egress, [(g.pods, g.ingress) for g in res.groups]])
    return res


def target_groups(
    targets: Sequence[Pod], ingress_of: Callable[[Pod | None], list[Entry]]
) -> list[Group]:
    """Targets whose ingress rules resolve differently (named ports) in groups of their
    own (see resolver.layout); no targets: one empty group with the rules resolved on
    no pod."""
    groups: dict[str, tuple[list[Entry], list[Pod]]] = {}
    for pod in targets:
        ingress = ingress_of(pod)
        groups.setdefault(repr(ingress), (ingress, []))[1].append(pod)
    if not groups:
        groups[""] = (ingress_of(None), [])
    return [
        Group(label="" if i == 0 else str(i), ingress=ingress, pods=[endpoint(p) for p in pods])
        for i, (ingress, pods) in enumerate(groups.values())
    ]


def endpoint(p: Pod) -> Obj:
    """A target as a podSelectorEndpoints entry."""
    return {"podIP": _primary(p), "hostIP": p.host_ip, "name": p.name, "namespace": p.namespace}


def _resolve(policy: Mapping[str, Any], world: World) -> Resolution:
    meta, spec = policy.get("metadata") or {}, policy.get("spec") or {}
    validate_spec(spec, application=policy.get("kind") == APPLICATION_KIND)
    namespace, name = meta.get("namespace", "default"), meta.get("name", "")
    types = policy_types(spec)
    select = compile_selector(spec.get("podSelector") or {})
    targets = sorted(
        (
            p
            for p in world.pods.values()
            if p.namespace == namespace and p.ready and not p.host_network and select(p.labels)
        ),
        key=lambda p: p.name,
    )
    ingress_rules = (spec.get("ingress") or []) if "Ingress" in types else []
    egress = _egress(world, namespace, spec.get("egress") or []) if "Egress" in types else []

    return Resolution(
        name=name,
        namespace=namespace,
        types=types,
        pod_selector=spec.get("podSelector") or {},
        groups=target_groups(
            targets, lambda pod: _ingress(world, namespace, ingress_rules, pod or _NO_POD)
        ),
        egress=egress,
    )


_NO_POD = Pod("", "", {}, (), "", False, False, ())


def _primary(pod: Pod) -> str:
    v4 = [ip for ip in pod.ips if ipaddress.ip_address(ip).version == 4]
    return (v4 or list(pod.ips))[0]
