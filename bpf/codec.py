"""Conversions between the rule models (bpf.ruleset) and the map structs (bpf.layout)."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Iterable

from bpf import layout as lay
from bpf.maps import TypedMap
from bpf.ruleset import Decision, PortRule, Portset, Prefix

LPM_KEY = lay.packer(lay.NpLpmKey)
U32_PACK = struct.Struct("<I")
WIDTH = {lay.NP_FAMILY_IPV4: 4, lay.NP_FAMILY_IPV6: 16}
NP_PREFIX_BITS = lay.NP_LPM_FAMILY_BITS


def lpm_key_bytes(p: Prefix, _pack: Callable[..., bytes] = LPM_KEY.pack) -> bytes:
    """np_lpm_key of a prefix, packed."""
    family, length, value = p
    return _pack(NP_PREFIX_BITS + length, family, value.to_bytes(WIDTH[family], "big"))


def prefix_from_key(key: lay.NpLpmKey) -> Prefix:
    width = 4 if key.family == lay.NP_FAMILY_IPV4 else 16
    value = int.from_bytes(bytes(key.addr)[:width], "big")
    return Prefix(key.family, key.prefixlen - lay.NP_LPM_FAMILY_BITS, value)


def host_key(address: lay.Address) -> lay.NpAddr:
    key = lay.NpAddr(family=lay.addr_family(address))
    ctypes.memmove(key.addr, lay.addr_bytes(address), 16)
    return key


def host_filter_record(keys: Iterable[bytes]) -> lay.NpHostFilter:
    """The np_host_filter record (see bpf/np.h) summarising ``keys`` (np_addr bytes, as
    host_key makes them): each address sets the bit numbered by the xor of its 16 bytes."""
    out = lay.NpHostFilter(ready=1)
    for key in keys:
        x = 0
        for byte in key[:16]:
            x ^= byte
        out.bits[x >> 6] |= 1 << (x & 63)
    return out


_RULES_FLAG = {
    lay.NP_PROTO_TCP: lay.NP_PORTSET_F_RULES_TCP,
    lay.NP_PROTO_UDP: lay.NP_PORTSET_F_RULES_UDP,
    lay.NP_PROTO_SCTP: lay.NP_PORTSET_F_RULES_SCTP,
}


def portset_to_map(ps: Portset) -> lay.NpPortset:
    out = lay.NpPortset()
    if ps.any_policy is not None:
        out.flags = lay.NP_PORTSET_F_ANY
        out.other_policy = ps.any_policy
        return out
    out.count = len(ps.rules)
    for i, r in enumerate(ps.rules):
        out.rules[i] = lay.NpPortRule(
            policy_id=r.policy_id,
            start_port=r.start,
            end_port=r.end,
            protocol=r.protocol,
            deny=int(r.deny),
            tier=r.tier,
            reason=r.reason,
        )
    if ps.other is not None:
        out.flags = lay.NP_PORTSET_F_OTHER
        for r in ps.rules:
            out.flags |= _RULES_FLAG[r.protocol]
        out.other_verdict, out.other_tier, out.other_reason, out.other_policy = ps.other
    return out


def portset_from_map(raw: lay.NpPortset) -> Portset:
    if raw.flags & lay.NP_PORTSET_F_ANY:
        return Portset(any_policy=raw.other_policy)
    rules = tuple(
        PortRule(
            r.protocol,
            r.start_port,
            r.end_port,
            r.policy_id,
            bool(r.deny),
            r.tier or lay.NP_TIER_NETWORK_POLICY,  # 0: written before tiers existed
            r.reason or lay.NP_REASON_RULE,
        )
        for r in raw.rules[: min(raw.count, lay.NP_MAX_PORT_RULES)]
    )
    other = None
    if raw.flags & lay.NP_PORTSET_F_OTHER:
        other = Decision(raw.other_verdict, raw.other_tier, raw.other_reason, raw.other_policy)
    return Portset(rules=rules, other=other)


def inline_value(ps: Portset) -> int | None:
    """The np_lpm_value of a port set that decides every port and protocol alike (no
    port set needed: see NP_LPM_INLINE), or None."""
    if ps.rules:
        return None
    if ps.any_policy is not None:
        d = Decision(
            lay.NP_VERDICT_ALLOW, lay.NP_TIER_NETWORK_POLICY, lay.NP_REASON_RULE, ps.any_policy
        )
    elif ps.other is not None:
        d = ps.other
    else:
        return None
    if d.policy_id > lay.NP_LPM_INLINE_POLICY_MASK:
        return None
    return (
        lay.NP_LPM_INLINE
        | (d.verdict & 1) << 30
        | (d.tier & 0xF) << 26
        | (d.reason & 0xF) << 22
        | d.policy_id
    )


def inline_portset(value: int) -> Portset:
    """The port set an inline np_lpm_value stands for (see :func:`inline_value`)."""
    d = Decision(
        (value >> 30) & 1,
        (value >> 26) & 0xF,
        (value >> 22) & 0xF,
        value & lay.NP_LPM_INLINE_POLICY_MASK,
    )
    if d == Decision(
        lay.NP_VERDICT_ALLOW, lay.NP_TIER_NETWORK_POLICY, lay.NP_REASON_RULE, d.policy_id
    ):
        return Portset(any_policy=d.policy_id)
    return Portset(other=d)


def policy_ids(portset: Portset) -> set[int]:
    """The policy ids a port set carries (0, none, excluded)."""
    ids = {r.policy_id for r in portset.rules}
    if portset.any_policy is not None:
        ids.add(portset.any_policy)
    if portset.other is not None:
        ids.add(portset.other.policy_id)
    ids.discard(0)
    return ids


def meta_ref(meta: lay.NpPodMeta | lay.NpPolicyMeta) -> tuple[str, str]:
    """(namespace, name) of a pod or policy name entry (np_pod_meta, np_policies)."""
    return (
        meta.namespace_.decode(errors="replace"),
        meta.name.decode(errors="replace"),
    )


def meta_name(meta: lay.NpPodMeta | lay.NpPolicyMeta) -> str:
    """``namespace/name`` of a pod or policy name entry; a cluster-scoped policy (a
    ClusterNetworkPolicy, namespace "") by its name alone."""
    ns, name = meta_ref(meta)
    return f"{ns}/{name}" if ns else name


def sum_stats(stats_map: TypedMap[ctypes.c_uint32, lay.NpStats]) -> dict[str, int]:
    """The datapath's counters (np_stats, one slot per CPU), summed."""
    totals = dict.fromkeys((f[0] for f in lay.NpStats._fields_), 0)
    for cpu in stats_map.lookup_percpu(ctypes.c_uint32(0)):
        for name in totals:
            totals[name] += getattr(cpu, name)
    return totals
