"""``ebpf`` commands: what the kernel holds, read directly (the agent need not run).

Output layouts follow the reference CLI (``aws-eks-na-cli ebpf progs | maps |
loaded-ebpfdata | dump-maps <id> | dump-cp-maps <id>``), so existing runbooks keep
working; ``--json`` gives the same data as objects.
"""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass
from typing import Any

from bpf import layout as lay
from bpf.codec import inline_portset, meta_name, meta_ref, portset_from_map, prefix_from_key
from bpf.errors import BpfError
from bpf.inspect import program_ids
from bpf.maps import MAP_TYPE_LPM_TRIE, Map, TypedMap
from bpf.objects import Program
from bpf.pins import PinPaths
from bpf.ruleset import Portset

SEPARATOR = "=" * 88
PROGRAM_NAMES = (lay.PROG_INGRESS, lay.PROG_EGRESS)


class CliError(Exception):
    """A problem to report in one line (exit 1)."""


@dataclass
class Pinned:
    pin_root: str

    def path(self, *parts: str) -> str:
        return os.path.join(self.pin_root, *parts)

    def check(self) -> None:
        if not os.path.ismount("/sys/fs/bpf") and not os.path.isdir(self.pin_root):
            raise CliError(
                "bpffs is not mounted at /sys/fs/bpf: the agent cannot be running "
                "on this node (mount -t bpf bpf /sys/fs/bpf)"
            )
        if not os.path.exists(PinPaths(self.pin_root).map(lay.MAP_PODS)):
            raise CliError(
                f"no datapath pinned under {self.pin_root} (is the agent installed "
                "on this node? see --bpf-pin-root)"
            )

    def open(self, name: str) -> Map:
        return Map.from_pin(PinPaths(self.pin_root).map(name))


def _policy_names(pinned: Pinned) -> dict[int, str]:
    with pinned.open(lay.MAP_POLICIES) as raw:
        return {k.value: meta_name(v) for k, v in TypedMap(raw, lay.u32, lay.NpPolicyMeta).items()}


def _pod_names(pinned: Pinned) -> dict[int, tuple[str, str]]:
    with pinned.open(lay.MAP_POD_META) as raw:
        return {k.value: meta_ref(v) for k, v in TypedMap(raw, lay.u32, lay.NpPodMeta).items()}


# ---- progs ---------------------------------------------------------------------------------
def progs() -> list[dict[str, Any]]:
    out = []
    for pid in program_ids():
        try:
            prog = Program.from_id(pid)
        except BpfError:
            continue  # unloaded meanwhile
        try:
            if prog.name in PROGRAM_NAMES:
                out.append(
                    {
                        "type": prog.info.type,
                        "id": prog.id,
                        "name": prog.name,
                        "tag": prog.info.tag,
                        "map_ids": list(prog.info.map_ids),
                    }
                )
        finally:
            prog.close()
    return out


def render_progs(items: list[dict[str, Any]]) -> str:
    lines = ["Programs currently loaded : "]
    for p in items:
        lines.append(
            f"Type : {p['type']} ID : {p['id']} Associated maps count : {len(p['map_ids'])}"
        )
        lines.append(SEPARATOR)
    return "\n".join(lines)


# ---- maps ----------------------------------------------------------------------------------
def maps(pinned: Pinned) -> list[dict[str, Any]]:
    pinned.check()
    out = []
    names = sorted(os.listdir(PinPaths(pinned.pin_root).maps))
    for name in names:
        with pinned.open(name) as m:
            out.append(_map_entry(m, name))
            if name == lay.MAP_RULES:
                for raw in m:
                    inner = m.lookup(raw)
                    if inner is None:
                        continue
                    with Map.from_id(int.from_bytes(inner, "little")) as trie:
                        entry = _map_entry(trie, trie.name)
                        entry["trie_id"] = int.from_bytes(raw, "little")
                        out.append(entry)
    return out


def _map_entry(m: Map, name: str) -> dict[str, Any]:
    return {
        "type": m.type,
        "id": m.id,
        "name": name,
        "key_size": m.key_size,
        "value_size": m.info.value_size,
        "max_entries": m.max_entries,
    }


def render_maps(items: list[dict[str, Any]]) -> str:
    lines = ["Maps currently loaded : "]
    for m in items:
        lines.append(f"Type : {m['type']} ID : {m['id']}")
        lines.append(
            f"Keysize {m['key_size']} Valuesize {m['value_size']} MaxEntries {m['max_entries']}"
        )
        lines.append(SEPARATOR)
    return "\n".join(lines)


# ---- loaded-ebpfdata -----------------------------------------------------------------------
def loaded(pinned: Pinned) -> list[dict[str, Any]]:
    """Per pod and direction: the program and the maps it uses for that pod."""
    pinned.check()
    names = _pod_names(pinned)
    shared: dict[str, int] = {}
    for name in (lay.MAP_PODS, lay.MAP_CT, lay.MAP_EVENTS):
        with pinned.open(name) as m:
            shared[name] = m.id
    progs_by_dir = {}
    for direction, name in (("ingress", lay.PROG_INGRESS), ("egress", lay.PROG_EGRESS)):
        prog = Program.from_pin(PinPaths(pinned.pin_root).program(name))
        progs_by_dir[direction] = (PinPaths(pinned.pin_root).program(name), prog.id)
        prog.close()
    out = []
    with pinned.open(lay.MAP_PODS) as raw_pods, pinned.open(lay.MAP_RULES) as rules:
        records = TypedMap(raw_pods, lay.u32, lay.NpPod).items()
        for key, rec in sorted(records, key=lambda kv: kv[0].value):
            ns, name = names.get(rec.pod_id, ("", f"unknown-{key.value}"))
            for direction in ("ingress", "egress"):
                trie_id = rec.ingress_trie if direction == "ingress" else rec.egress_trie
                state = rec.ingress_state if direction == "ingress" else rec.egress_state
                trie_map = 0
                if trie_id:
                    inner = rules.lookup(trie_id.to_bytes(4, "little"))
                    trie_map = int.from_bytes(inner, "little") if inner else 0
                path, prog_id = progs_by_dir[direction]
                out.append(
                    {
                        "pin_path": path,
                        "pod": f"{ns}/{name}" if ns else name,
                        "pod_identifier": f"{name}-{ns}" if ns else name,
                        "ifindex": key.value,
                        "direction": direction,
                        "prog_id": prog_id,
                        "state": lay.STATE_NAMES.get(state, str(state)),
                        "maps": [
                            {"name": f"{direction}_map", "id": trie_map},
                            {"name": lay.MAP_PODS, "id": shared[lay.MAP_PODS]},
                            {"name": lay.MAP_EVENTS, "id": shared[lay.MAP_EVENTS]},
                            {"name": lay.MAP_CT, "id": shared[lay.MAP_CT]},
                        ],
                    }
                )
    return out


def render_loaded(items: list[dict[str, Any]]) -> str:
    lines = []
    for e in items:
        lines.append(f"PinPath:  {e['pin_path']}")
        lines.append(f"Pod Identifier : {e['pod_identifier']}  Direction : {e['direction']} ")
        lines.append(f"Prog ID:  {e['prog_id']}")
        lines.append(f"State:  {e['state']}")
        lines.append("Associated Maps -> ")
        for m in e["maps"]:
            lines.append(f"Map Name:  {m['name']}")
            lines.append(f"Map ID:  {m['id']}")
        lines.append(SEPARATOR)
    return "\n".join(lines)


# ---- dump-maps -----------------------------------------------------------------------------
def dump(pinned: Pinned, map_id: int) -> dict[str, Any]:
    try:
        m = Map.from_id(map_id)
    except BpfError as exc:
        raise CliError(f"no map with id {map_id}: {exc.strerror}") from None
    with m:
        if m.type == MAP_TYPE_LPM_TRIE and m.key_size == 24:
            return {"kind": "rules", "id": map_id, "entries": _dump_rules(pinned, m)}
        if m.name == lay.MAP_CT:
            return {"kind": "conntrack", "id": map_id, "entries": conntrack_entries(m)}
        if m.name == lay.MAP_PODS:
            return {
                "kind": "pods",
                "id": map_id,
                "entries": [
                    {
                        "ifindex": k.value,
                        "pod_id": v.pod_id,
                        "ingress": lay.STATE_NAMES.get(v.ingress_state, ""),
                        "egress": lay.STATE_NAMES.get(v.egress_state, ""),
                        "ingress_trie": v.ingress_trie,
                        "egress_trie": v.egress_trie,
                    }
                    for k, v in TypedMap(m, lay.u32, lay.NpPod).items()
                ],
            }
        return {
            "kind": "raw",
            "id": map_id,
            "name": m.name,
            "entries": [{"key": k.hex(), "value": v.hex()} for k, v in m.items()],
        }


def _dump_rules(pinned: Pinned, trie: Map, *, decisions: bool = False) -> list[dict[str, Any]]:
    """Each prefix with its port rules; ``decisions``: every decision (with its tier
    and verdict, the other-ports one too), not only what NetworkPolicy allows."""
    policies = _policy_names(pinned)
    with pinned.open(lay.MAP_PORTSETS) as raw_sets:
        portsets = TypedMap(raw_sets, lay.u32, lay.NpPortset)
        cache: dict[int, Portset] = {}
        out = []
        for k, v in trie.items():
            prefix = prefix_from_key(lay.NpLpmKey.from_buffer_copy(k))
            ps_id = lay.NpLpmValue.from_buffer_copy(v).portset_id
            if ps_id & lay.NP_LPM_INLINE:
                cache[ps_id] = inline_portset(ps_id)
            elif ps_id and ps_id not in cache:
                raw = portsets.lookup(lay.u32(ps_id))
                cache[ps_id] = portset_from_map(raw) if raw is not None else Portset()
            ps = cache.get(ps_id, Portset())
            values = []
            if ps.any_policy is not None:
                values.append(
                    {
                        "protocol": "ANY PROTOCOL",
                        "start_port": 0,
                        "end_port": 0,
                        "policy": policies.get(ps.any_policy, ""),
                    }
                )
            for r in ps.rules:
                values.append(
                    {
                        "protocol": lay.PROTOCOL_NAMES.get(r.protocol, str(r.protocol)),
                        "start_port": r.start,
                        "end_port": r.end,
                        "policy": policies.get(r.policy_id, ""),
                        **_decision(r.tier, int(not r.deny), raw=decisions),
                    }
                )
            if decisions and ps.other is not None:
                values.append(
                    {
                        "protocol": "ANY PROTOCOL",
                        "start_port": 0,
                        "end_port": 65535,
                        "policy": policies.get(ps.other.policy_id, ""),
                        "tier": ps.other.tier,
                        "verdict": ps.other.verdict,
                    }
                )
            out.append({"cidr": str(prefix), "values": values})
    return sorted(
        out,
        key=lambda e: (ipaddress.ip_network(e["cidr"]).version, ipaddress.ip_network(e["cidr"])),
    )


def _decision(tier: int, verdict: int, *, raw: bool) -> dict[str, Any]:
    """A rule's decision: raw numbers, or for dump-maps only what differs from a
    NetworkPolicy allow (a folded tier's decision), named."""
    if raw:
        return {"tier": tier, "verdict": verdict}
    if verdict == lay.NP_VERDICT_DENY or tier != lay.NP_TIER_NETWORK_POLICY:
        return {"verdict": "ALLOW" if verdict else "DENY", "tier": lay.TIER_NAMES[tier]}
    return {}


def render_dump(result: dict[str, Any]) -> str:
    if result["kind"] != "rules":
        lines = [f"{k}: {v}" for e in result["entries"] for k, v in e.items()]
        return "\n".join([*lines, "Done reading all entries"])
    chunks = []
    for e in result["entries"]:
        lines = [f"Key : IP/Prefixlen - {e['cidr']} ", "-------------------"]
        if not e["values"]:
            lines += [
                "Value Entry :  0",
                "Protocol -  DENY (except)",
                "StartPort -  0",
                "Endport -  0",
                "-------------------",
            ]
        for i, v in enumerate(e["values"]):
            lines += [
                f"Value Entry :  {i}",
                f"Protocol -  {v['protocol']}",
                f"StartPort -  {v['start_port']}",
                f"Endport -  {v['end_port']}",
            ]
            if v["policy"]:
                lines.append(f"Policy -  {v['policy']}")
            if "verdict" in v:
                lines.append(f"Verdict -  {v['verdict']} ({v['tier']})")
            lines.append("-------------------")
        chunks.append("\n".join(lines))
    return "              *     ".join([*chunks, "Done reading all entries"])


# ---- dump-cp-maps --------------------------------------------------------------------------
# The reference's ClusterNetworkPolicy maps hold, per prefix, entries whose "Priority" is
# priority * 10 + action (Deny 0, Accept 1, Pass 2), Baseline entries 2000 higher. Ours
# hold the tiers already folded (Pass is resolved away): each range an Admin or Baseline
# rule decides is shown the reference's way.
_CP_ACTION = {lay.NP_VERDICT_DENY: 0, lay.NP_VERDICT_ALLOW: 1}
_CP_TIER = {lay.NP_TIER_ADMIN: ("Admin", 0), lay.NP_TIER_BASELINE: ("Baseline", 2000)}


def dump_cp(pinned: Pinned, map_id: int, priorities: dict[str, int]) -> dict[str, Any]:
    """The cluster-tier decisions of a rule trie (a pod direction's ``trie`` id, as
    ``loaded-ebpfdata`` and ``np-cli pods`` show it). ``priorities``: each
    ClusterNetworkPolicy's priority by name (from the agent; empty if it is not running:
    the priority is then unknown)."""
    try:
        m = Map.from_id(map_id)
    except BpfError as exc:
        raise CliError(f"no map with id {map_id}: {exc.strerror}") from None
    with m:
        if m.type != MAP_TYPE_LPM_TRIE or m.key_size != 24:
            raise CliError(f"map {map_id} ({m.name}) is not a rule trie")
        entries = []
        for e in _dump_rules(pinned, m, decisions=True):
            values = []
            for v in e["values"]:
                tier = _CP_TIER.get(v["tier"])
                if tier is None:
                    continue
                prio = priorities.get(v["policy"])
                values.append(
                    {
                        "protocol": v["protocol"],
                        "start_port": v["start_port"],
                        "end_port": v["end_port"],
                        "tier": tier[0],
                        "action": "Deny" if v["verdict"] == lay.NP_VERDICT_DENY else "Accept",
                        "policy": v["policy"],
                        "priority": (
                            prio * 10 + _CP_ACTION[v["verdict"]] + tier[1]
                            if prio is not None
                            else None
                        ),
                    }
                )
            if values:
                entries.append({"cidr": e["cidr"], "values": values})
        return {"kind": "cluster-rules", "id": map_id, "entries": entries}


def render_dump_cp(result: dict[str, Any]) -> str:
    chunks = []
    for e in result["entries"]:
        lines = [f"Key: {e['cidr']}"]
        for i, v in enumerate(e["values"]):
            prio = v["priority"] if v["priority"] is not None else "? (agent not running)"
            lines += [
                "-------------------",
                f"Entry {i}:",
                f"Protocol  - {v['protocol']}",
                f"Priority  - {prio}",
                f"StartPort - {v['start_port']}",
                f"EndPort   - {v['end_port']}",
                f"Action    - {v['tier']} {v['action']} ({v['policy']})",
                "-------------------",
            ]
        lines.append("*******************************")
        chunks.append("\n".join(lines))
    return "\n".join([*chunks, "Done reading all entries"])


# ---- conntrack -----------------------------------------------------------------------------
def conntrack_entries(m: Map, limit: int | None = None) -> list[dict[str, Any]]:
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    out = []
    for k, v in TypedMap(m, lay.NpCtKey, lay.NpCtValue).items():
        pod = lay.addr_from(bytes(k.pod_addr), k.family)
        peer = lay.addr_from(bytes(k.peer_addr), k.family)
        out.append(
            {
                "ifindex": k.ifindex,
                "protocol": lay.PROTOCOL_NAMES.get(k.protocol, str(k.protocol)),
                "pod": f"{pod}:{k.pod_port}" if k.family == 4 else f"[{pod}]:{k.pod_port}",
                "peer": f"{peer}:{k.peer_port}" if k.family == 4 else f"[{peer}]:{k.peer_port}",
                "origin": lay.DIRECTION_NAMES.get(v.origin, "?"),
                "reason": lay.REASON_NAMES.get(v.reason, str(v.reason)),
                "idle_seconds": round(max(0, now - v.last_seen_ns) / 1e9, 1),
                "pod_id": v.pod_id,
            }
        )
        if limit is not None and len(out) >= limit:
            break
    return out
