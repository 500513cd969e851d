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
class WorldSpec:
    family: int = 4
    namespaces: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: list[PodSpec] = field(default_factory=list)

    def namespace_labels(self, ns: str) -> dict[str, str]:
        return {**self.namespaces.get(ns, {}), "kubernetes.io/metadata.name": ns}


@dataclass
class Probe:
    port: int
    protocol: str
    default: bool
    rules: list[Obj]


@dataclass
class Step:
    actions: list[Obj]
    probes: list[Probe]


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
    steps = []
    for s in raw.get("steps") or []:
        probes = [
            Probe(
                int(p["port"]),
                str(p.get("protocol", "TCP")).upper(),
                str(p["expect"].get("default", "allow")) == "allow",
                list(p["expect"].get("rules") or []),
            )
            for p in s.get("probes") or []
        ]
        steps.append(Step(list(s.get("actions") or []), probes))
    return Scenario(
        name=str(raw.get("name") or path.stem),
        source=str(raw.get("source", "")),
        world=world,
        steps=steps,
        path=str(path),
    )


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
    out = {}
    for src in pods:
        for dst in pods:
            if src == dst:
                continue
            allow = probe.default
            for rule in probe.rules:
                if _selects(rule.get("from"), src) and _selects(rule.get("to"), dst):
                    allow = bool(rule["allow"])
            out[(src, dst)] = allow
    return out


def dump(scenario_raw: Obj) -> str:
    return yaml.safe_dump(scenario_raw, sort_keys=False)
