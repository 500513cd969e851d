"""How a resolved NetworkPolicy is laid out into PolicyEndpoint objects (pure).

Agents join every object of one policy (same namespace and ``spec.policyRef.name``): a
pod listed in any of them gets the entries of all of them. Two layouts honour that:

- ``paired`` (ours, the default): every object lists a chunk of pods with a chunk of the
  rules, every pod chunk paired with every rule chunk; each object is complete for the
  pods it lists, so an agent that reads objects one by one is right too.
- ``controller`` (what the AWS controller writes): pods, ingress entries and egress
  entries are packed independently, at most ``chunk_size`` of each per object. Entries
  stay in the object that holds them; new ones top up existing objects first, then go
  to new objects that may hold only pods, only ingress or only egress entries. An object
  left with nothing is deleted (one is always kept).

**Target groups.** Where the policy's ingress named ports resolve differently on
different target pods (``http`` is 8080 on one and 9090 on another), exactness needs
per-group rules within one policy. Each group's objects carry the group in the
``GROUP_ANNOTATION`` (none for the first group), and our agent joins by (policy, group).
An agent that ignores the annotation (the AWS one) joins the groups: each target then
allows the union of the groups' ports, which is exactly what the AWS controller itself
writes (it resolves a named port on every target and unions the results): never less
than the NetworkPolicy allows, never more than the controller's own output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Obj = dict[str, Any]
Layout = Literal["paired", "controller"]
LAYOUTS: tuple[Layout, ...] = ("paired", "controller")
KINDS = ("ingress", "egress", "podSelectorEndpoints")


@dataclass(frozen=True)
class Group:
    label: str  # "" for the first group, then "1", "2", ...
    pods: list[Obj]  # podSelectorEndpoints entries
    ingress: list[Obj]


@dataclass(frozen=True)
class ClusterHead:
    """What every ClusterPolicyEndpoint of a ClusterNetworkPolicy copies from it."""

    tier: str
    priority: int
    subject: Obj


@dataclass(frozen=True)
class Resolution:
    name: str
    namespace: str  # "" for a ClusterNetworkPolicy
    types: list[str]
    pod_selector: Mapping[str, Any]
    groups: list[Group]
    egress: list[Obj]
    cluster: ClusterHead | None = None  # set: ClusterPolicyEndpoints

    def spec(self, *, pods: Sequence[Obj], ingress: Sequence[Obj], egress: Sequence[Obj]) -> Obj:
        if self.cluster is not None:
            return {
                "policyRef": {"name": self.name},
                "tier": self.cluster.tier,
                "priority": self.cluster.priority,
                "subject": dict(self.cluster.subject),
                "podSelectorEndpoints": list(pods),
                "ingress": list(ingress),
                "egress": list(egress),
            }
        return {
            "policyRef": {"name": self.name, "namespace": self.namespace},
            "podSelector": dict(self.pod_selector),
            "podIsolation": list(self.types),
            "podSelectorEndpoints": list(pods),
            "ingress": list(ingress),
            "egress": list(egress),
        }


@dataclass(frozen=True)
class Desired:
    group: str
    spec: Obj


@dataclass(frozen=True)
class Held:
    """An object the resolver wrote, as it remembers it: its group and the keys of
    the entries it holds, per kind (see ``entry_key``)."""

    name: str
    group: str
    keys: Mapping[str, frozenset[str]]


def entry_key(entry: Mapping[str, Any]) -> str:
    return hashlib.blake2b(
        json.dumps(entry, sort_keys=True, separators=(",", ":")).encode(), digest_size=8
    ).hexdigest()


def keys_of(spec: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    return {k: frozenset(entry_key(e) for e in spec.get(k) or []) for k in KINDS}


def _chunks(items: Sequence[Obj], size: int) -> list[Sequence[Obj]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


def paired(res: Resolution, chunk_size: int) -> list[Desired]:
    out: list[Desired] = []
    for g in res.groups:
        in_chunks, out_chunks = _chunks(g.ingress, chunk_size), _chunks(res.egress, chunk_size)
        for pod_chunk in _chunks(g.pods, chunk_size):
            for j in range(max(len(in_chunks), len(out_chunks))):
                out.append(
                    Desired(
                        g.label,
                        res.spec(
                            pods=pod_chunk,
                            ingress=in_chunks[j] if j < len(in_chunks) else [],
                            egress=out_chunks[j] if j < len(out_chunks) else [],
                        ),
                    )
                )
    return out


@dataclass
class Plan:
    """Objects to write: (existing name, or None for a new object) with its content;
    and the existing objects to delete (after the writes)."""

    writes: list[tuple[str | None, Desired]]
    deletes: list[str]


def packed(res: Resolution, chunk_size: int, held: Sequence[Held]) -> Plan:
    """The controller's layout, keeping every entry where it already is."""
    plan = Plan([], [])
    labels = {g.label for g in res.groups}
    for h in held:
        if h.group not in labels:
            plan.deletes.append(h.name)
    for g in res.groups:
        mine = sorted((h for h in held if h.group == g.label), key=lambda h: h.name)
        _pack_group(res, g, chunk_size, mine, plan)
    return plan


def _pack_group(res: Resolution, g: Group, size: int, held: Sequence[Held], plan: Plan) -> None:
    want = {"ingress": g.ingress, "egress": res.egress, "podSelectorEndpoints": g.pods}
    left = {kind: {entry_key(e): e for e in entries} for kind, entries in want.items()}
    objects: list[tuple[str | None, dict[str, list[Obj]]]] = []
    for h in held:  # what is still wanted stays where it is
        content = {
            kind: [left[kind].pop(k) for k in sorted(h.keys.get(kind, ())) if k in left[kind]]
            for kind in KINDS
        }
        objects.append((h.name, content))
    for kind in KINDS:  # top up, then new objects holding this kind only
        queue = [left[kind][k] for k in sorted(left[kind])]
        for _, content in objects:
            room = size - len(content[kind])
            if room > 0 and queue:
                content[kind] += queue[:room]
                queue = queue[room:]
        while queue:
            fresh: dict[str, list[Obj]] = {k: [] for k in KINDS}
            fresh[kind], queue = queue[:size], queue[size:]
            objects.append((None, fresh))
    kept = [(n, c) for n, c in objects if any(c.values())]
    if not kept:  # a policy always has one object (isolation with nothing allowed)
        kept = objects[:1] or [(None, {k: [] for k in KINDS})]
    for name, _ in objects:
        if name is not None and all(name != n for n, _ in kept):
            plan.deletes.append(name)
    for name, content in kept:
        spec = res.spec(
            pods=_canonical(content["podSelectorEndpoints"]),
            ingress=_canonical(content["ingress"]),
            egress=_canonical(content["egress"]),
        )
        plan.writes.append((name, Desired(g.label, spec)))


def _canonical(entries: list[Obj]) -> list[Obj]:
    return sorted(entries, key=lambda e: json.dumps(e, sort_keys=True))
