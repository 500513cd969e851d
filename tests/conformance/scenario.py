"""Conformance scenarios (../shared/conformance/FORMAT.md): loading, templates, defaulting,
and the expected reachability matrix of a step."""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fakekube.store import default_cluster_network_policy, default_network_policy

Obj = dict[str, Any]
PodKey = tuple[str, str]  # (namespace, name)

DEFAULT_PORTS = (
    {"port": 80, "protocol": "TCP", "name": "serve-80-tcp"},
    {"port": 81, "protocol": "TCP", "name": "serve-81-tcp"},
    {"port": 80, "protocol": "UDP", "name": "serve-80-udp"},
    {"port": 81, "protocol": "UDP", "name": "serve-81-udp"},
)


@dataclass
class PodSpec:
    namespace: str
    name: str
    labels: dict[str, str]
    ports: tuple[Obj, ...] = DEFAULT_PORTS

    @property
    def key(self) -> PodKey:
        return (self.namespace, self.name)


@dataclass
class DnsSpec:
    """FORMAT-dns.md: the DNS pod's records (templates unrendered) and TTL."""

    ttl: int = 3600
    records: dict[str, Any] = field(default_factory=dict)

    @property
    def short(self) -> bool:
        """A short TTL: earlier steps' answers have expired when a step converges."""
        return self.ttl < 600


@dataclass
class WorldSpec:
    family: int = 4
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: list[PodSpec] = field(default_factory=list)
    dns: DnsSpec | None = None

    def namespace_labels(self, ns: str) -> dict[str, str]:
        return {**self.namespaces.get(ns, {}), "kubernetes.io/metadata.name": ns}


@dataclass
class Probe:
    port: int
    protocol: str
    default: bool
    rules: list[Obj]
    skip: list[Obj] = field(default_factory=list)  # {from, to} pairs not compared


@dataclass
class NameProbe:
    """FORMAT-dns.md: ``from`` asks the DNS pod for ``name``, then at once connects to
    the answer's first address (or to ``address``, rendered)."""

    source: PodKey
    name: str
    port: int
    protocol: str
    allow: bool
    address: str | None = None


@dataclass
class Step:
    actions: list[Obj]
    probes: list[Probe]
    name_probes: list[NameProbe] = field(default_factory=list)


@dataclass
class Scenario:
    name: str
    source: str
    world: WorldSpec
    steps: list[Step]
    path: str = ""


def standard_world(family: int = 4) -> WorldSpec:
    return WorldSpec(
        family=family,
        namespaces={ns: {} for ns in ("x", "y", "z")},
        pods=[PodSpec(ns, p, {"pod": p}) for ns in ("x", "y", "z") for p in ("a", "b", "c")],
    )


def load(path: Path) -> Scenario:
    raw = yaml.safe_load(path.read_text())
    world_raw = raw.get("world") or {}
    family = 6 if str(world_raw.get("family", "ipv4")).lower() == "ipv6" else 4
    if "namespaces" in world_raw or "pods" in world_raw:
        namespaces = {k: dict(v or {}) for k, v in (world_raw.get("namespaces") or {}).items()}
        if "pods" in world_raw:
            pods = [
                PodSpec(
                    p["ns"],
                    p["name"],
                    dict(p.get("labels") or {}),
                    tuple(p["ports"]) if p.get("ports") else DEFAULT_PORTS,
                )
                for p in world_raw.get("pods") or []
            ]
        else:  # namespaces given (e.g. for their labels), pods not: the standard pods
            pods = [PodSpec(ns, p, {"pod": p}) for ns in namespaces for p in ("a", "b", "c")]
        world = WorldSpec(family=family, namespaces=namespaces, pods=pods)
        for p in world.pods:
            world.namespaces.setdefault(p.namespace, {})
    else:
        world = standard_world(family)
    if world_raw.get("dns") is not None:
        raw_dns = world_raw["dns"] or {}
        world.dns = DnsSpec(int(raw_dns.get("ttl", 3600)), dict(raw_dns.get("records") or {}))
    steps = []
    for s in raw.get("steps") or []:
        probes = [
            Probe(
                int(p["port"]),
                str(p.get("protocol", "TCP")).upper(),
                str(p["expect"].get("default", "allow")) == "allow",
                list(p["expect"].get("rules") or []),
                list(p["expect"].get("skip") or []),
            )
            for p in s.get("probes") or []
        ]
        name_probes = [
            NameProbe(
                _pod_key(n["from"]),
                str(n["name"]),
                int(n["port"]),
                str(n.get("protocol", "TCP")).upper(),
                str(n["expect"]) == "allow",
                n.get("address"),
            )
            for n in s.get("name_probes") or []
        ]
        steps.append(Step(list(s.get("actions") or []), probes, name_probes))
    return Scenario(
        name=str(raw.get("name") or path.stem),
        source=str(raw.get("source", "")),
        world=world,
        steps=steps,
        path=str(path),
    )


def _pod_key(text: str) -> PodKey:
    ns, _, name = text.partition("/")
    return (ns, name)


def discover(directories: list[Path]) -> Iterator[Path]:
    for d in directories:
        yield from sorted(p for p in d.rglob("*.yaml") if p.is_file())
        yield from sorted(p for p in d.rglob("*.yml") if p.is_file())


# ---- templates and defaulting -----------------------------------------------------------
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_TEMPLATE = re.compile(r"\{\{\s*(\w+)\s*([^}]*?)\s*\}\}")


def render(obj: Any, *, address: Callable[[PodKey], Address], node_ip: str) -> Any:
    """Replace templates in every string of ``obj``."""
    if isinstance(obj, dict):
        return {k: render(v, address=address, node_ip=node_ip) for k, v in obj.items()}
    if isinstance(obj, list):
        return [render(v, address=address, node_ip=node_ip) for v in obj]
    if not isinstance(obj, str):
        return obj

    def sub(m: re.Match[str]) -> str:
        fn, arg = m.group(1), m.group(2).split()
        if fn == "node_ip":
            return node_ip
        ns, _, name = arg[0].partition("/")
        addr = address((ns, name))
        if fn == "ip":
            return str(addr)
        if fn == "host":
            return f"{addr}/{32 if addr.version == 4 else 128}"
        if fn == "net":
            bits = int(arg[1]) + (96 if addr.version == 6 else 0)
            return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))
        raise ValueError(f"unknown template {m.group(0)}")

    return _TEMPLATE.sub(sub, obj)


def application_defaults(policy: Obj) -> Obj:
    """The CRD's defaulting of an ApplicationNetworkPolicy: port protocol TCP."""
    from fakekube.store import default_application_network_policy

    p = copy.deepcopy(policy)
    default_application_network_policy(p)
    return p


def api_defaults(policy: Obj) -> Obj:
    """The API server's defaulting of a NetworkPolicy (as the fake API server does it)."""
    p = copy.deepcopy(policy)
    default_network_policy(p)
    return p


def cluster_defaults(policy: Obj) -> Obj:
    """The CRD's defaulting of a ClusterNetworkPolicy (FORMAT-cluster.md: a portNumber or
    portRange without protocol is TCP)."""
    p = copy.deepcopy(policy)
    default_cluster_network_policy(p)
    return p


# ---- expectations ------------------------------------------------------------------------
def _selects(sel: Obj | None, pod: PodKey) -> bool:
    if not sel:
        return True
    if "ns" in sel and sel["ns"] != pod[0]:
        return False
    return not ("pod" in sel and sel["pod"] != pod[1])


def expected(probe: Probe, pods: list[PodKey]) -> dict[tuple[PodKey, PodKey], bool]:
    """The expected matrix; pairs the probe skips are left out."""
    out = {}
    for src in pods:
        for dst in pods:
            if src == dst:
                continue
            if any(_selects(s.get("from"), src) and _selects(s.get("to"), dst) for s in probe.skip):
                continue
            allow = probe.default
            for rule in probe.rules:
                if _selects(rule.get("from"), src) and _selects(rule.get("to"), dst):
                    allow = bool(rule["allow"])
            out[(src, dst)] = allow
    return out


def dump(scenario_raw: Obj) -> str:
    return yaml.safe_dump(scenario_raw, sort_keys=False)
