"""An independent reference evaluator of Kubernetes NetworkPolicy (pure Python).

Written from the API specification, sharing no code with the resolver or the datapath:
a connection from pod S to pod D on (port, protocol) is allowed when S's egress and D's
ingress both allow it. A direction of a pod is isolated when some policy in the pod's
namespace selects it and lists that direction in policyTypes; an isolated direction
allows what any such policy's rules allow. Rules match peers (pod/namespace selectors, or
ipBlock with except on the peer's address) and ports (none: all; a number, a range with
endPort, or a name resolved on the destination pod's container ports).

ClusterNetworkPolicies (docs/cluster-network-policy.md, "Verdict", with its "We"
choices) come first and last: per direction, the Admin tier (the matching rules of the
policies whose subject selects the pod: lowest priority wins, then Deny > Accept >
Pass), then the NetworkPolicy tier if a NetworkPolicy isolates the direction, then the
Baseline tier, then allow. A cluster rule matches a peer pod by ``namespaces`` or
``pods`` selectors or ``networks`` (the pod's address in a CIDR) and a port by
``portNumber``, ``portRange`` or ``namedPort`` (the destination pod has a container
port of that name with the connection's number and protocol).
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.conformance.scenario import (
    Obj,
    PodKey,
    PodSpec,
    WorldSpec,
    api_defaults,
    cluster_defaults,
    render,
)

_ACTION_RANK = {"Deny": 0, "Accept": 1, "Pass": 2}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _label_selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], set(expr.get("values") or [])
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


@dataclass
class _Pod:
    labels: dict[str, str]
    ports: tuple[Obj, ...]
    address: Address


@dataclass
class Evaluator:
    family: int
    address_of: Callable[[PodKey], Address]
    node_ip: str = "172.31.255.1"
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: dict[PodKey, _Pod] = field(default_factory=dict)
    policies: dict[tuple[str, str], Obj] = field(default_factory=dict)
    cluster_policies: dict[str, Obj] = field(default_factory=dict)

    @classmethod
    def of(cls, world: WorldSpec, address_of: Callable[[PodKey], Address]) -> Evaluator:
        ev = cls(world.family, address_of)
        for ns in world.namespaces:
            ev.namespaces[ns] = world.namespace_labels(ns)
        for p in world.pods:
            ev._add_pod(p)
        return ev

    def _add_pod(self, p: PodSpec) -> None:
        self.namespaces.setdefault(p.namespace, {"kubernetes.io/metadata.name": p.namespace})
        self.pods[p.key] = _Pod(dict(p.labels), p.ports, self.address_of(p.key))

    # ---- actions ----------------------------------------------------------------------
    def apply(self, action: Obj) -> None:
        ((kind, arg),) = action.items()
        if kind in ("create_policy", "update_policy"):
            policy = api_defaults(
                render(arg, address=self._addr_for_template, node_ip=self.node_ip)
            )
            meta = policy["metadata"]
            self.policies[(meta.get("namespace", "default"), meta["name"])] = policy
        elif kind == "delete_policy":
            self.policies.pop((arg.get("namespace", "default"), arg["name"]), None)
        elif kind in ("create_cluster_policy", "update_cluster_policy"):
            policy = cluster_defaults(
                render(arg, address=self._addr_for_template, node_ip=self.node_ip)
            )
            self.cluster_policies[policy["metadata"]["name"]] = policy
        elif kind == "delete_cluster_policy":
            self.cluster_policies.pop(arg["name"], None)
        elif kind == "set_pod_labels":
            ns, name = arg["pod"].split("/")
            self.pods[(ns, name)].labels = dict(arg.get("labels") or {})
        elif kind == "set_namespace_labels":
            ns = arg["namespace"]
            self.namespaces[ns] = {**(arg.get("labels") or {}), "kubernetes.io/metadata.name": ns}
        elif kind == "create_pod":
            ports = tuple(arg["ports"]) if arg.get("ports") else None
            spec = PodSpec(arg["ns"], arg["name"], dict(arg.get("labels") or {}))
            if ports:
                spec.ports = ports
            self._add_pod(spec)
        elif kind == "delete_pod":
            ns, name = arg["pod"].split("/")
            self.pods.pop((ns, name), None)
        else:
            raise ValueError(f"unknown action {kind}")

    def _addr_for_template(self, key: PodKey) -> Address:
        return self.address_of(key)

    # ---- semantics --------------------------------------------------------------------
    def allowed(self, src: PodKey, dst: PodKey, port: int, protocol: str) -> bool:
        return self._direction_allows(
            src, dst, port, protocol, egress=True
        ) and self._direction_allows(dst, src, port, protocol, egress=False)

    def _direction_allows(
        self, subject: PodKey, peer: PodKey, port: int, protocol: str, *, egress: bool
    ) -> bool:
        admin = self._tier("Admin", subject, peer, port, protocol, egress=egress)
        if admin is not None:
            return admin
        isolated = self._networkpolicy(subject, peer, port, protocol, egress=egress)
        if isolated is not None:
            return isolated
        baseline = self._tier("Baseline", subject, peer, port, protocol, egress=egress)
        return True if baseline is None else baseline

    # ---- cluster tiers ----------------------------------------------------------------
    def _tier(
        self, tier: str, subject: PodKey, peer: PodKey, port: int, protocol: str, *, egress: bool
    ) -> bool | None:
        """The tier's verdict: True (Accept), False (Deny), None (Pass or no match)."""
        best: tuple[int, int] | None = None
        destination = peer if egress else subject
        for policy in self.cluster_policies.values():
            spec = policy["spec"]
            if spec["tier"] != tier or not self._cluster_selects(spec["subject"], subject):
                continue
            for rule in spec.get("egress" if egress else "ingress") or []:
                peers = rule.get("to" if egress else "from") or []
                if not any(self._cluster_peer(pe, peer) for pe in peers):
                    continue
                if not self._cluster_ports(rule.get("ports"), destination, port, protocol):
                    continue
                rank = (int(spec["priority"]), _ACTION_RANK[rule["action"]])
                if best is None or rank < best:
                    best = rank
        if best is None or best[1] == _ACTION_RANK["Pass"]:
            return None
        return best[1] == _ACTION_RANK["Accept"]

    def _cluster_selects(self, subject: Obj, pod: PodKey) -> bool:
        if subject.get("namespaces") is not None:
            return _label_selector_matches(subject["namespaces"], self.namespaces.get(pod[0], {}))
        pods = subject["pods"]
        return _label_selector_matches(
            pods.get("namespaceSelector") or {}, self.namespaces.get(pod[0], {})
        ) and _label_selector_matches(pods.get("podSelector") or {}, self.pods[pod].labels)

    def _cluster_peer(self, peer: Obj, pod: PodKey) -> bool:
        if peer.get("networks") is not None:
            addr = self.pods[pod].address
            return any(
                addr.version == ipaddress.ip_network(n, strict=False).version
                and addr in ipaddress.ip_network(n, strict=False)
                for n in peer["networks"]
            )
        if peer.get("namespaces") is None and peer.get("pods") is None:
            return False  # domainNames: never a pod
        return self._cluster_selects(peer, pod)

    def _cluster_ports(
        self, ports: list[Obj] | None, destination: PodKey, port: int, protocol: str
    ) -> bool:
        if not ports:
            return True
        for p in ports:
            if p.get("portNumber") is not None:
                n = p["portNumber"]
                if n.get("protocol", "TCP") == protocol and int(n["port"]) == port:
                    return True
            elif p.get("portRange") is not None:
                r = p["portRange"]
                if r.get("protocol", "TCP") == protocol and int(r["start"]) <= port <= int(
                    r["end"]
                ):
                    return True
            elif p.get("namedPort") is not None:
                for cp in self.pods[destination].ports:
                    if (
                        cp.get("name") == p["namedPort"]
                        and cp.get("protocol", "TCP") == protocol
                        and int(cp["port"]) == port
                    ):
                        return True
        return False

    # ---- the NetworkPolicy tier -------------------------------------------------------
    def _networkpolicy(
        self, subject: PodKey, peer: PodKey, port: int, protocol: str, *, egress: bool
    ) -> bool | None:
        """None if no NetworkPolicy isolates the direction, else its verdict."""
        kind = "Egress" if egress else "Ingress"
        selecting = [
            p
            for (ns, _), p in self.policies.items()
            if ns == subject[0]
            and kind in p["spec"]["policyTypes"]
            and _label_selector_matches(
                p["spec"].get("podSelector") or {}, self.pods[subject].labels
            )
        ]
        if not selecting:
            return None
        destination = peer if egress else subject
        for policy in selecting:
            for rule in policy["spec"].get("egress" if egress else "ingress") or []:
                peers = rule.get("to" if egress else "from") or []
                if peers and not any(self._peer(pe, peer, policy) for pe in peers):
                    continue
                if self._ports(rule.get("ports") or [], destination, port, protocol):
                    return True
        return False

    def _peer(self, peer: Obj, pod: PodKey, policy: Obj) -> bool:
        block = peer.get("ipBlock")
        if block:
            addr = self.pods[pod].address
            net = ipaddress.ip_network(block["cidr"], strict=False)
            if net.version != addr.version or addr not in net:
                return False
            return not any(
                addr in ipaddress.ip_network(e, strict=False)
                for e in block.get("except") or []
                if ipaddress.ip_network(e, strict=False).version == addr.version
            )
        ns_sel = peer.get("namespaceSelector")
        if ns_sel is None:
            if pod[0] != policy["metadata"].get("namespace", "default"):
                return False
        elif not _label_selector_matches(ns_sel, self.namespaces.get(pod[0], {})):
            return False
        pod_sel = peer.get("podSelector")
        return pod_sel is None or _label_selector_matches(pod_sel, self.pods[pod].labels)

    def _ports(self, ports: list[Obj], destination: PodKey, port: int, protocol: str) -> bool:
        if not ports:
            return True
        for p in ports:
            if (p.get("protocol") or "TCP") != protocol:
                continue
            want = p.get("port")
            if want is None:
                return True
            if isinstance(want, str) and not want.isdigit():
                for cp in self.pods[destination].ports:
                    if (
                        cp.get("name") == want
                        and cp.get("protocol", "TCP") == protocol
                        and int(cp["port"]) == port
                    ):
                        return True
                continue
            low = int(want)
            high = int(p["endPort"]) if p.get("endPort") is not None else low
            if low <= port <= high:
                return True
        return False

    def matrix(self, port: int, protocol: str) -> dict[tuple[PodKey, PodKey], bool]:
        keys = sorted(self.pods)
        return {(s, d): self.allowed(s, d, port, protocol) for s in keys for d in keys if s != d}

    def copy(self) -> Evaluator:
        return copy.deepcopy(self)
