"""Compile NetworkPolicy peer rules into longest-prefix-match entries (pure, no kernel).

A direction's rules are ``PeerRule(cidr, excepts, ports, policy_id)``; a peer address is
allowed on (protocol, port) when *some* rule contains the address, none of that rule's
``except`` blocks contains it, and one of the rule's ports matches.

An LPM trie returns only the longest matching prefix, so each prefix stored must carry
everything allowed at addresses whose longest match it is. Because all stored prefixes
(rule CIDRs and except blocks) are nested or disjoint, that set depends only on the
prefix: the union of the ports of every rule whose CIDR contains the prefix and none of
whose excepts does. :func:`compile_rules` computes exactly that for every prefix, drops
entries that repeat their nearest stored ancestor, and normalises each port set to
sorted, disjoint ranges (first policy wins where policies overlap, for attribution).

Nothing is truncated: a port set beyond ``NP_MAX_PORT_RULES`` ranges raises
:class:`~bpf.errors.RuleLimitError` naming the prefix.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from bpf.errors import RuleLimitError
from bpf.layout import (
    NP_FAMILY_IPV4,
    NP_FAMILY_IPV6,
    NP_MAX_PORT_RULES,
    NP_PROTO_ANY,
    NP_PROTO_SCTP,
    NP_PROTO_TCP,
    NP_PROTO_UDP,
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PORT_PROTOCOLS = (NP_PROTO_TCP, NP_PROTO_UDP, NP_PROTO_SCTP)
_WIDTH = {NP_FAMILY_IPV4: 32, NP_FAMILY_IPV6: 128}
_PREFIX = struct.Struct("<BB16s")


@dataclass(frozen=True, order=True)
class PortRange:
    """One port rule: ``protocol`` TCP/UDP/SCTP with an inclusive port range, or
    ``NP_PROTO_ANY`` (then the range must be 0-65535): every protocol, every port."""

    protocol: int
    start: int = 0
    end: int = 65535

    def __post_init__(self) -> None:
        if self.protocol not in (*PORT_PROTOCOLS, NP_PROTO_ANY):
            raise ValueError(f"unsupported protocol number {self.protocol}")
        if not 0 <= self.start <= self.end <= 65535:
            raise ValueError(f"invalid port range {self.start}-{self.end}")
        if self.protocol == NP_PROTO_ANY and (self.start, self.end) != (0, 65535):
            raise ValueError("an any-protocol rule covers every port")


ALL_TRAFFIC = (PortRange(NP_PROTO_ANY),)


class Prefix(NamedTuple):
    """A prefix as the datapath keys it: family, prefix length and the address as int."""

    family: int
    length: int
    value: int

    @classmethod
    def of(cls, net: Network | Prefix) -> Prefix:
        if isinstance(net, Prefix):
            return net
        family = NP_FAMILY_IPV4 if net.version == 4 else NP_FAMILY_IPV6
        return cls(family, net.prefixlen, int(net.network_address))

    def network(self) -> Network:
        if self.family == NP_FAMILY_IPV4:
            return ipaddress.IPv4Network((self.value, self.length))
        return ipaddress.IPv6Network((self.value, self.length))

    def ancestor(self, length: int) -> Prefix:
        shift = _WIDTH[self.family] - length
        return Prefix(self.family, length, (self.value >> shift) << shift)

    def __str__(self) -> str:
        return str(self.network())


class PeerRule(NamedTuple):
    """Peers in ``cidr`` but in none of ``excepts`` may use ``ports`` (empty: anything).
    Networks may be given as :mod:`ipaddress` objects or, compactly, as prefixes."""

    cidr: Network | Prefix
    excepts: tuple[Network | Prefix, ...] = ()
    ports: tuple[PortRange, ...] = ()
    policy_id: int = 0


class PortRule(NamedTuple):
    """A normalised rule as stored in a port set (protocol TCP/UDP/SCTP)."""

    protocol: int
    start: int
    end: int
    policy_id: int


class Portset(NamedTuple):
    """What one prefix allows. ``any_policy`` set: everything (by that policy);
    otherwise ``rules``, sorted by (protocol, start) and disjoint. Empty: nothing."""

    rules: tuple[PortRule, ...] = ()
    any_policy: int | None = None

    @property
    def allows_nothing(self) -> bool:
        return self.any_policy is None and not self.rules

    def canonical(self) -> bytes:
        """Content bytes (for digests): any-policy flag and id, then each rule."""
        head = struct.pack("<BI", self.any_policy is not None, self.any_policy or 0)
        return head + b"".join(struct.pack("<BHHI", *r) for r in self.rules)

    def allows(self, protocol: int, port: int | None) -> int | None:
        """Reference semantics of the datapath's check: the allowing policy or None.
        ``port`` None means unknown (a later fragment): only full coverage allows."""
        if self.any_policy is not None:
            return self.any_policy
        for r in self.rules:
            if r.protocol != protocol:
                continue
            if port is None:
                if (r.start, r.end) == (0, 65535):
                    return r.policy_id
            elif r.start <= port <= r.end:
                return r.policy_id
        return None


NOTHING = Portset()


@dataclass
class CompiledRules:
    """The entries of one direction's trie: prefix -> port set."""

    entries: dict[Prefix, Portset] = field(default_factory=dict)
    _digest: bytes | None = field(default=None, repr=False, compare=False)

    def digest(self) -> bytes:
        """Content identity (BLAKE2b-256 of the sorted entries), for sharing one trie
        between pods with equal rules. Computed once: entries are not changed after."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=32)
            canon: dict[Portset, bytes] = {}
            for prefix in sorted(self.entries):
                ps = self.entries[prefix]
                if ps not in canon:
                    canon[ps] = ps.canonical()
                h.update(_PREFIX.pack(prefix.family, prefix.length,
                                      prefix.value.to_bytes(16, "big")))
                h.update(canon[ps])
            self._digest = h.digest()
        return self._digest

    def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Prefix | None:
        """Longest stored prefix containing ``address`` (reference LPM, for tests/explain)."""
        family = NP_FAMILY_IPV4 if address.version == 4 else NP_FAMILY_IPV6
        host = Prefix(family, _WIDTH[family], int(address))
        for length in range(_WIDTH[family], -1, -1):
            p = host.ancestor(length)
            if p in self.entries:
                return p
        return None


def normalise_ports(contributions: Iterable[tuple[int, tuple[PortRange, ...]]],
                    *, where: object = "port set") -> Portset:
    """Union of (policy_id, ports) contributions as a normalised :class:`Portset`."""
    ordered = sorted(contributions, key=lambda c: c[0])
    for policy_id, ports in ordered:
        if not ports or any(p.protocol == NP_PROTO_ANY for p in ports):
            return Portset(any_policy=policy_id)

    rules: list[PortRule] = []
    for protocol in PORT_PROTOCOLS:
        covered: list[tuple[int, int, int]] = []  # disjoint (start, end, policy), sorted
        for policy_id, ports in ordered:
            for pr in sorted(p for p in ports if p.protocol == protocol):
                covered = _add_uncovered(covered, pr.start, pr.end, policy_id)
        if not covered:
            continue
        if _covers_all(covered):
            rules.append(PortRule(protocol, 0, 65535, covered[0][2]))
            continue
        merged: list[tuple[int, int, int]] = []
        for start, end, pol in covered:
            if merged and merged[-1][2] == pol and merged[-1][1] + 1 == start:
                merged[-1] = (merged[-1][0], end, pol)
            else:
                merged.append((start, end, pol))
        rules.extend(PortRule(protocol, s, e, pol) for s, e, pol in merged)
    if len(rules) > NP_MAX_PORT_RULES:
        raise RuleLimitError(
            f"{where}: {len(rules)} distinct port ranges after merging, "
            f"the datapath holds at most {NP_MAX_PORT_RULES} per CIDR"
        )
    return Portset(rules=tuple(rules))


def _add_uncovered(covered: list[tuple[int, int, int]], start: int, end: int,
                   policy_id: int) -> list[tuple[int, int, int]]:
    """Add the parts of [start, end] not yet covered, labelled with policy_id."""
    out: list[tuple[int, int, int]] = []
    cursor = start
    for s, e, pol in covered:
        if e < cursor or s > end:
            out.append((s, e, pol))
            continue
        if s > cursor:
            out.append((cursor, s - 1, policy_id))
        out.append((s, e, pol))
        cursor = max(cursor, e + 1)
    if cursor <= end:
        out.append((cursor, end, policy_id))
    out.sort()
    return out


def _covers_all(covered: list[tuple[int, int, int]]) -> bool:
    expect = 0
    for s, e, _ in covered:
        if s != expect:
            return False
        expect = e + 1
    return expect == 65536


def compile_rules(rules: Sequence[PeerRule]) -> CompiledRules:
    """Flatten one direction's rules into trie entries (see module docstring)."""
    by_cidr: dict[Prefix, list[int]] = {}
    excepts: list[frozenset[Prefix]] = []
    prefixes: set[Prefix] = set()
    none: frozenset[Prefix] = frozenset()
    for i, rule in enumerate(rules):
        cidr = rule.cidr if type(rule.cidr) is Prefix else Prefix.of(rule.cidr)
        indexes = by_cidr.get(cidr)
        if indexes is None:
            by_cidr[cidr] = [i]
            prefixes.add(cidr)
        else:
            indexes.append(i)
        if not rule.excepts:
            excepts.append(none)
            continue
        inside = frozenset(
            e for e in map(Prefix.of, rule.excepts)
            if e.family == cidr.family and e.length >= cidr.length
            and e.ancestor(cidr.length) == cidr
        )
        excepts.append(inside)
        prefixes.update(inside)

    lengths: dict[int, list[int]] = {NP_FAMILY_IPV4: [], NP_FAMILY_IPV6: []}
    for p in prefixes:
        lengths[p.family].append(p.length)
    for fam in lengths:
        lengths[fam] = sorted(set(lengths[fam]))
    any_excepts = any(excepts)

    # Many prefixes see the same contributions: normalise each distinct set once.
    normalised: dict[tuple[tuple[int, tuple[PortRange, ...]], ...], Portset] = {}
    kept: dict[Prefix, Portset] = {}
    if not any_excepts and all(len(v) <= 1 for v in lengths.values()):
        # The common case (pod IPs, or ipBlocks of one size): no prefix contains another,
        # so each keeps exactly the rules given for it.
        for p, indexes in by_cidr.items():
            contributions = tuple((rules[i].policy_id, rules[i].ports) for i in indexes)
            portset = normalised.get(contributions)
            if portset is None:
                portset = normalise_ports(contributions, where=p)
                normalised[contributions] = portset
            if not portset.allows_nothing:
                kept[p] = portset
        return CompiledRules(entries=kept)
    for p in sorted(prefixes):
        ancestors = [p.ancestor(n) for n in lengths[p.family] if n <= p.length]
        anc_set = set(ancestors) if any_excepts else None
        contributions = tuple(
            (rules[i].policy_id, rules[i].ports)
            for anc in ancestors for i in by_cidr.get(anc, ())
            if anc_set is None or not excepts[i] & anc_set
        )
        portset = normalised.get(contributions)
        if portset is None:
            portset = normalise_ports(contributions, where=p) if contributions else NOTHING
            normalised[contributions] = portset
        nearest = None
        for n in reversed(lengths[p.family]):
            if n < p.length and (a := p.ancestor(n)) in kept:
                nearest = kept[a]
                break
        if nearest == portset or (nearest is None and portset.allows_nothing):
            continue
        kept[p] = portset
    return CompiledRules(entries=kept)
