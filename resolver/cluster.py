"""ClusterNetworkPolicy -> ClusterPolicyEndpoint contents (pure; no API access).

Resolution follows the AWS controller (docs/cluster-network-policy.md, "Resolution")
and does better where the doc says it is wrong:

- Subjects: network-ready pods (an IP, not Succeeded/Failed, not hostNetwork) of the
  namespaces ``subject.namespaces`` selects, or matching ``subject.pods`` (its
  ``namespaceSelector`` and ``podSelector``).
- Peers: ``namespaces``/``pods`` become the bare IPs of matching ready pods, every
  address of dual-stack pods, cluster-wide; egress peers also add the ClusterIPs of
  non-headless Services whose selector the peer's podSelector matches (``namespaces``
  peers: every Service of those namespaces). ``networks`` are copied. ``domainNames``
  become ``domainName`` entries. **Every** ingress peer counts (the controller resolves
  a rule only in its first peer's namespaces).
- Ports: ``portNumber`` -> {protocol, port}, ``portRange`` -> {protocol, port, endPort}.
  ``namedPort`` resolves per destination pod (the controller panics on it): on ingress
  on each subject pod (subjects resolving differently form target groups, as for
  NetworkPolicy: see resolver.layout), on egress on each peer pod (a named port never
  matches a Service or a network). A rule whose ports resolve to nothing there matches
  nothing there.
- Every entry carries its rule's ``action``; duplicates are merged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.echo import bounded
from common.selectors import compile_selector
from resolver.layout import ClusterHead, Resolution
from resolver.resolve import Pod, World, _dedupe, checked, target_groups
from resolver.validate import InvalidPolicy, _cidr, _objects, _selector, _string, domain_names

Obj = dict[str, Any]
Entry = dict[str, Any]
TIERS = ("Admin", "Baseline")

ACTIONS = ("Accept", "Deny", "Pass")
PROTOCOLS = ("TCP", "UDP", "SCTP")


# ---- validation (the CRD's schema and its CEL rules, for the fields read here) ------------
def validate_cluster_spec(spec: Any) -> None:
    """Raise InvalidPolicy naming the first field the API server would refuse."""
    if not isinstance(spec, Mapping):
        raise InvalidPolicy("spec", "must be an object")
    if spec.get("tier") not in TIERS:
        raise InvalidPolicy("spec.tier", f"{bounded(spec.get('tier'))} is not Admin or Baseline")
    priority = spec.get("priority")
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 1000:
        raise InvalidPolicy("spec.priority", f"{bounded(priority)} is not an integer in 0-1000")
    _subject(spec.get("subject"))
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        rules = spec.get(direction)
        if rules is not None and isinstance(rules, list) and len(rules) > 100:
            raise InvalidPolicy(f"spec.{direction}", "at most 100 rules")
        for where, rule in _objects(rules, f"spec.{direction}"):
            action = rule.get("action")
            if action not in ACTIONS:
                raise InvalidPolicy(f"{where}.action", f"{bounded(action)} is not {ACTIONS}")
            peers = rule.get(peers_key)
            if not isinstance(peers, list) or not 1 <= len(peers) <= 100:
                raise InvalidPolicy(f"{where}.{peers_key}", "1 to 100 peers are required")
            for at, peer in _objects(peers, f"{where}.{peers_key}"):
                _peer(peer, at, egress=direction == "egress", action=action)
            ports = rule.get("ports")
            if ports is not None and (not isinstance(ports, list) or not 1 <= len(ports) <= 100):
                raise InvalidPolicy(f"{where}.ports", "1 to 100 entries when present")
            for at, port in _objects(ports, f"{where}.ports"):
                _port(port, at)


def _subject(subject: Any) -> None:
    if not isinstance(subject, Mapping):
        raise InvalidPolicy("spec.subject", "must be an object")
    _one_of(subject, ("namespaces", "pods"), "spec.subject")
    if "namespaces" in subject:
        _selector(subject["namespaces"], "spec.subject.namespaces")
    else:
        _pods(subject["pods"], "spec.subject.pods")


def _pods(value: Any, where: str) -> None:
    if not isinstance(value, Mapping):
        raise InvalidPolicy(where, "must be an object")
    for key in ("namespaceSelector", "podSelector"):
        if key not in value:
            raise InvalidPolicy(f"{where}.{key}", "required ({} selects all)")
        _selector(value[key], f"{where}.{key}")


def _one_of(obj: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    present = [k for k in keys if obj.get(k) is not None]
    if len(present) != 1:
        raise InvalidPolicy(where, f"exactly one of {', '.join(keys)} is required")


def _peer(peer: Mapping[str, Any], where: str, *, egress: bool, action: str) -> None:
    keys = ("namespaces", "pods", "networks", "domainNames") if egress else ("namespaces", "pods")
    _one_of(peer, keys, where)
    if "namespaces" in peer and peer["namespaces"] is not None:
        _selector(peer["namespaces"], f"{where}.namespaces")
    elif peer.get("pods") is not None:
        _pods(peer["pods"], f"{where}.pods")
    elif peer.get("networks") is not None:
        nets = peer["networks"]
        if not isinstance(nets, list) or not 1 <= len(nets) <= 25:
            raise InvalidPolicy(f"{where}.networks", "1 to 25 CIDRs are required")
        for i, n in enumerate(nets):
            _cidr(n, f"{where}.networks[{i}]")
    else:
        domain_names(peer["domainNames"], f"{where}.domainNames")
        if action != "Accept":
            raise InvalidPolicy(f"{where}.domainNames", "only rules with action Accept")


def _port(port: Mapping[str, Any], where: str) -> None:
    _one_of(port, ("portNumber", "portRange", "namedPort"), where)
    if port.get("namedPort") is not None:
        _string(port["namedPort"], f"{where}.namedPort")
        return
    key = "portNumber" if port.get("portNumber") is not None else "portRange"
    body = port[key]
    at = f"{where}.{key}"
    if not isinstance(body, Mapping):
        raise InvalidPolicy(at, "must be an object")
    if (body.get("protocol") or "TCP") not in PROTOCOLS:
        raise InvalidPolicy(f"{at}.protocol", f"{bounded(body.get('protocol'))} is not {PROTOCOLS}")
    fields = ("port",) if key == "portNumber" else ("start", "end")
    for f in fields:
        v = body.get(f)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
            raise InvalidPolicy(f"{at}.{f}", f"{bounded(v)} is not a port number (1-65535)")
    if key == "portRange" and body["start"] >= body["end"]:
        raise InvalidPolicy(at, f"start {body['start']} must be below end {body['end']}")


# ---- resolution ---------------------------------------------------------------------------
def _ready(p: Pod) -> bool:
    return p.ready and not p.host_network


def _select_pods(world: World, *, namespaces: Any = None, pods: Any = None) -> list[Pod]:
    """Pods a subject or peer selects: ``namespaces`` (a namespace selector: every pod
    of those namespaces) or ``pods`` ({namespaceSelector, podSelector})."""
    if namespaces is not None:
        match_ns = compile_selector(namespaces)
        ns = {n for n, labels in world.namespaces.items() if match_ns(labels)}
        match_pod = compile_selector({})
    else:
        match_ns = compile_selector(pods.get("namespaceSelector") or {})
        ns = {n for n, labels in world.namespaces.items() if match_ns(labels)}
        match_pod = compile_selector(pods.get("podSelector") or {})
    return sorted(
        (p for p in world.pods.values() if p.namespace in ns and _ready(p) and match_pod(p.labels)),
        key=lambda p: (p.namespace, p.name),
    )


def _port_entry(port: Mapping[str, Any], *, on: Pod | None) -> dict[str, Any] | None:
    """One rule port as an endpoint port; a named port resolved on ``on`` (None: a
    destination that is not a pod, where it never matches)."""
    if port.get("namedPort") is not None:
        if on is None:
            return None
        for name, proto, number in on.ports:
            if name == port["namedPort"]:
                return {"protocol": proto, "port": number}
        return None
    if port.get("portNumber") is not None:
        body = port["portNumber"]
        return {"protocol": body.get("protocol") or "TCP", "port": int(body["port"])}
    body = port["portRange"]
    return {
        "protocol": body.get("protocol") or "TCP",
        "port": int(body["start"]),
        "endPort": int(body["end"]),
    }


def _ports(rule_ports: Sequence[Mapping[str, Any]] | None, *, on: Pod | None) -> list[Obj] | None:
    """[] = all traffic; None = the rule has ports and none resolves here."""
    if not rule_ports:
        return []
    resolved = [r for r in (_port_entry(p, on=on) for p in rule_ports) if r is not None]
    return _dedupe(resolved) or None


def _has_named(rule_ports: Sequence[Mapping[str, Any]] | None) -> bool:
    return any(p.get("namedPort") is not None for p in rule_ports or [])


def _entry(cidr: str, ports: list[Obj], action: str) -> Entry:
    e: Entry = {"cidr": cidr, "action": action}
    if ports:
        e["ports"] = ports
    return e


def _ingress(world: World, rules: Sequence[Mapping[str, Any]], subject: Pod | None) -> list[Entry]:
    out: list[Entry] = []
    for rule in rules:
        action = rule["action"]
        ports = _ports(rule.get("ports"), on=subject)
        if ports is None:
            continue
        for peer in rule.get("from") or []:
            for pod in _select_pods(
                world, namespaces=peer.get("namespaces"), pods=peer.get("pods")
            ):
                out += [_entry(ip, ports, action) for ip in pod.ips]
    return _dedupe(out)


def _egress(world: World, rules: Sequence[Mapping[str, Any]]) -> list[Entry]:
    out: list[Entry] = []
    for rule in rules:
        action, rule_ports = rule["action"], rule.get("ports")
        numeric = [p for p in rule_ports or [] if p.get("namedPort") is None]
        fixed = _ports(numeric, on=None) if numeric or not rule_ports else None
        for peer in rule.get("to") or []:
            if peer.get("networks") is not None:
                if fixed is not None:
                    out += [_entry(n, fixed, action) for n in peer["networks"]]
                continue
            if peer.get("domainNames") is not None:
                if fixed is not None:
                    out += [
                        {"domainName": d, "action": action, **({"ports": fixed} if fixed else {})}
                        for d in peer["domainNames"]
                    ]
                continue
            for pod in _select_pods(
                world, namespaces=peer.get("namespaces"), pods=peer.get("pods")
            ):
                ports = _ports(rule_ports, on=pod)
                if ports is not None:
                    out += [_entry(ip, ports, action) for ip in pod.ips]
            if fixed is not None:
                out += _services(world, peer, fixed, action)
    return _dedupe(out)


def _services(world: World, peer: Mapping[str, Any], ports: list[Obj], action: str) -> list[Entry]:
    """ClusterIPs of non-headless Services the peer selects (traffic to a ClusterIP is
    judged before kube-proxy's DNAT), on the Service ports the rule's ports admit."""
    if peer.get("namespaces") is not None:
        match_ns = compile_selector(peer["namespaces"])
        match_pod = None
    else:
        match_ns = compile_selector(peer["pods"].get("namespaceSelector") or {})
        match_pod = compile_selector(peer["pods"].get("podSelector") or {})
    out: list[Entry] = []
    for svc in world.services.values():
        if not svc.selector or not svc.cluster_ips:
            continue
        if not match_ns(world.namespaces.get(svc.namespace, {})):
            continue
        if match_pod is not None and not match_pod(svc.selector):
            continue
        if ports:
            svc_ports = [
                {"protocol": proto, "port": port}
                for proto, port, _target in svc.ports
                if any(
                    p["protocol"] == proto and p["port"] <= port <= (p.get("endPort") or p["port"])
                    for p in ports
                )
            ]
            if not svc_ports:
                continue
        else:
            svc_ports = []
        out += [_entry(ip, _dedupe(svc_ports), action) for ip in svc.cluster_ips]
    return out


def cluster_resolution(policy: Mapping[str, Any], world: World) -> Resolution:
    """What a ClusterNetworkPolicy resolves to; InvalidPolicy if it is malformed."""
    meta = policy.get("metadata") or {} if isinstance(policy, Mapping) else {}
    return checked(f"clusternetworkpolicy {meta.get('name', '?')}", lambda: _resolve(policy, world))


def _resolve(policy: Mapping[str, Any], world: World) -> Resolution:
    meta, spec = policy.get("metadata") or {}, policy.get("spec") or {}
    validate_cluster_spec(spec)
    subject = spec["subject"]
    subjects = _select_pods(world, namespaces=subject.get("namespaces"), pods=subject.get("pods"))
    ingress_rules = spec.get("ingress") or []
    if any(_has_named(r.get("ports")) for r in ingress_rules):
        groups = target_groups(subjects, lambda pod: _ingress(world, ingress_rules, pod))
    else:  # the same rules for every subject: resolved once
        same = _ingress(world, ingress_rules, None)
        groups = target_groups(subjects, lambda _pod: same)
    return Resolution(
        name=str(meta.get("name", "")),
        namespace="",
        types=[],
        pod_selector={},
        groups=groups,
        egress=_egress(world, spec.get("egress") or []),
        cluster=ClusterHead(
            tier=spec["tier"], priority=int(spec["priority"]), subject=dict(subject)
        ),
    )
