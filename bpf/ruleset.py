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

Nothing is truncated silently: a port set beyond ``NP_MAX_PORT_RULES`` ranges raises
:class:`~bpf.errors.RuleLimitError` naming the prefix; the caller may then compile again
with ``truncate=True``, which keeps the ranges that fit (fewer allowed ports, never more)
and lists the prefixes cut, so that it can enforce what fits and report the rest.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import struct
from collections.abc import Callable, Collection, Iterable, Sequence
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
    NP_REASON_NO_PORT_MATCH,
    NP_REASON_RULE,
    NP_TIER_ERROR,
    NP_TIER_NETWORK_POLICY,
    NP_VERDICT_ALLOW,
    NP_VERDICT_DENY,
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


class Decision(NamedTuple):
    """A datapath decision: verdict, the tier that decided, why, and whose rule."""

    verdict: int  # NP_VERDICT_*
    tier: int  # NP_TIER_*
    reason: int  # NP_REASON_*
    policy_id: int = 0

    @property
    def allowed(self) -> bool:
        return self.verdict == NP_VERDICT_ALLOW


NO_PORT_MATCH = Decision(NP_VERDICT_DENY, NP_TIER_NETWORK_POLICY, NP_REASON_NO_PORT_MATCH)
# a port-less packet (a later fragment without its first) whose protocol has rules that
# decide its ports differently: the datapath cannot tell which applies, so it denies
UNDECIDABLE = Decision(NP_VERDICT_DENY, NP_TIER_ERROR, NP_REASON_NO_PORT_MATCH)


class PortRule(NamedTuple):
    """A normalised rule as stored in a port set (protocol TCP/UDP/SCTP): allows (or,
    for ClusterNetworkPolicy Deny rules, denies) its ports, in tier ``tier``."""

    protocol: int
    start: int
    end: int
    policy_id: int
    deny: bool = False
    tier: int = NP_TIER_NETWORK_POLICY
    reason: int = NP_REASON_RULE

    @property
    def decision(self) -> Decision:
        verdict = NP_VERDICT_DENY if self.deny else NP_VERDICT_ALLOW
        return Decision(verdict, self.tier, self.reason, self.policy_id)


class Portset(NamedTuple):
    """What one prefix decides. ``any_policy`` set: everything allowed (by that policy);
    otherwise ``rules``, sorted by (protocol, start) and disjoint, decide their ports
    and every other port or protocol gets ``other`` (None: denied, no port matched, as
    NetworkPolicy has it). Empty: nothing allowed."""

    rules: tuple[PortRule, ...] = ()
    any_policy: int | None = None
    other: Decision | None = None

    @property
    def allows_nothing(self) -> bool:
        return self.any_policy is None and not self.rules and self.other is None

    def canonical(self) -> bytes:
        """Content bytes (for digests): any-policy flag and id, the other decision,
        then each rule."""
        head = struct.pack("<BI", self.any_policy is not None, self.any_policy or 0)
        if self.other is not None:
            head += struct.pack("<BBBBI", 1, *self.other)
        return head + b"".join(struct.pack("<BHHIBBB", *r) for r in self.rules)

    def decide(self, protocol: int, port: int | None) -> Decision:
        """Reference semantics of the datapath's port check (``np_ports_decide``).
        ``port`` None means unknown (a later fragment): only full coverage decides."""
        if self.any_policy is not None:
            return Decision(
                NP_VERDICT_ALLOW, NP_TIER_NETWORK_POLICY, NP_REASON_RULE, self.any_policy
            )
        for r in self.rules:
            if r.protocol != protocol:
                continue
            if port is None:
                if (r.start, r.end) == (0, 65535):
                    return r.decision
            elif r.start <= port <= r.end:
                return r.decision
        if self.other is None:
            return NO_PORT_MATCH
        if port is None and any(r.protocol == protocol for r in self.rules):
            return UNDECIDABLE
        return self.other

    def allows(self, protocol: int, port: int | None) -> int | None:
        """The allowing policy, or None if the port set does not allow the flow."""
        d = self.decide(protocol, port)
        return d.policy_id if d.allowed else None

    def matching_rule(self, protocol: int, port: int) -> PortRule | None:
        """The rule that decides (protocol, port), if one does (not ``other``)."""
        return next(
            (r for r in self.rules if r.protocol == protocol and r.start <= port <= r.end), None
        )


NOTHING = Portset()


@dataclass
class CompiledRules:
    """The entries of one direction's trie: prefix -> port set."""

    entries: dict[Prefix, Portset] = field(default_factory=dict)
    # prefixes whose port set was cut to the limit (compile_rules(truncate=True))
    truncated: list[Prefix] = field(default_factory=list, compare=False)
    _digest: bytes | None = field(default=None, repr=False, compare=False)

    def digest(self) -> bytes:
        """Content identity (BLAKE2b-256 of the sorted entries), for sharing one trie
        between pods with equal rules. Computed once: entries are not changed after."""
        if self._digest is None:
            entries = self.entries
            pack = _PREFIX.pack
            canon: dict[int, bytes] = {}  # by identity: few distinct port sets
            parts: list[bytes] = []
            for prefix in sorted(entries):
                ps = entries[prefix]
                raw = canon.get(id(ps))
                if raw is None:
                    raw = canon[id(ps)] = ps.canonical()
                family, length, value = prefix
                parts.append(pack(family, length, value.to_bytes(16, "big")))
                parts.append(raw)
            self._digest = hashlib.blake2b(b"".join(parts), digest_size=32).digest()
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


def normalise_ports(
    contributions: Iterable[tuple[int, tuple[PortRange, ...]]],
    *,
    where: object = "port set",
    truncate: bool = False,
) -> Portset:
    """Union of (policy_id, ports) contributions as a normalised :class:`Portset`.
    Beyond ``NP_MAX_PORT_RULES`` ranges: RuleLimitError, or with ``truncate`` the first
    ranges that fit (fewer allowed ports: never more than the rules allow)."""
    ordered = sorted(contributions, key=lambda c: c[0])
    for policy_id, ports in ordered:
        if not ports or any(p.protocol == NP_PROTO_ANY for p in ports):
            return Portset(any_policy=policy_id)

    by_protocol: dict[int, list[tuple[int, int, int]]] = {p: [] for p in PORT_PROTOCOLS}
    for policy_id, ports in ordered:
        for pr in ports:
            by_protocol[pr.protocol].append((pr.start, pr.end, policy_id))
    rules: list[PortRule] = []
    for protocol in PORT_PROTOCOLS:
        if not by_protocol[protocol]:
            continue
        covered = _label_ranges(by_protocol[protocol])
        if _covers_all(covered):
            rules.append(PortRule(protocol, 0, 65535, covered[0][2]))
            continue
        rules.extend(PortRule(protocol, s, e, pol) for s, e, pol in covered)
    if len(rules) > NP_MAX_PORT_RULES:
        if truncate:
            return Portset(rules=tuple(rules[:NP_MAX_PORT_RULES]))
        raise RuleLimitError(
            f"{where}: {len(rules)} distinct port ranges after merging, "
            f"the datapath holds at most {NP_MAX_PORT_RULES} per CIDR"
        )
    return Portset(rules=tuple(rules))


def _label_ranges(ranges: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(start, end, policy) ranges -> disjoint, sorted ranges covering the same ports,
    each port labelled with the first (lowest id) policy whose ranges cover it, adjacent
    ranges of one policy merged. A sweep over the sorted starts with a heap of the open
    ranges: O(n log n) (the union of 10,000 ranges takes milliseconds)."""
    ranges = sorted(ranges)
    out: list[tuple[int, int, int]] = []
    open_: list[tuple[int, int]] = []  # (policy, end) of ranges covering ``pos``
    i, n, pos = 0, len(ranges), 0
    while i < n or open_:
        if not open_:
            pos = max(pos, ranges[i][0])
        while i < n and ranges[i][0] <= pos:
            _start, end, policy = ranges[i]
            if end >= pos:
                heapq.heappush(open_, (policy, end))
            i += 1
        while open_ and open_[0][1] < pos:
            heapq.heappop(open_)
        if not open_:
            continue
        policy, end = open_[0]
        if i < n:
            end = min(end, ranges[i][0] - 1)  # a range opening there may take over
        if out and out[-1][2] == policy and out[-1][1] + 1 == pos:
            out[-1] = (out[-1][0], end, policy)
        else:
            out.append((pos, end, policy))
        pos = end + 1
    return out


def _covers_all(covered: list[tuple[int, int, int]]) -> bool:
    expect = 0
    for s, e, _ in covered:
        if s != expect:
            return False
        expect = e + 1
    return expect == 65536


def compile_rules(rules: Sequence[PeerRule], *, truncate: bool = False) -> CompiledRules:
    """Flatten one direction's rules into trie entries (see module docstring).
    ``truncate``: a port set over the limit keeps the ranges that fit (and the prefix is
    listed in ``truncated``) instead of raising RuleLimitError."""
    normalise, cut = _normaliser(truncate)
    return _truncated(_compile(rules, normalise), cut)


def compile_grouped(
    groups: Sequence[tuple[int, tuple[PortRange, ...], Sequence[Prefix]]],
    *,
    truncate: bool = False,
) -> CompiledRules:
    """compile_rules for rules without excepts given as (policy_id, ports, prefixes):
    the same result as for the PeerRules they stand for, in that order, without building
    one per prefix (a pod's rules are often hundreds of thousands of prefixes)."""
    normalise, cut = _normaliser(truncate)
    by_cidr: dict[Prefix, list[tuple[int, tuple[PortRange, ...]]]] = {}
    get = by_cidr.get
    for policy_id, ports, prefixes in groups:
        contribution = (policy_id, ports)
        for p in prefixes:
            found = get(p)
            if found is None:
                by_cidr[p] = [contribution]
            else:
                found.append(contribution)
    flat = _plain(by_cidr, normalise)
    if flat is None:  # some prefix contains another: the general path
        rules = [PeerRule(p, (), ports, policy_id) for policy_id, ports, ps in groups for p in ps]
        flat = _compile(rules, normalise)
    return _truncated(flat, cut)


def _normaliser(truncate: bool) -> tuple[Normalise, set[Portset]]:
    """normalise_ports for one compile, and the port sets it cut (``truncate``)."""
    cut: set[Portset] = set()

    def normalise(
        contributions: tuple[tuple[int, tuple[PortRange, ...]], ...], where: Prefix
    ) -> Portset:
        try:
            return normalise_ports(contributions, where=where)
        except RuleLimitError:
            if not truncate:
                raise
            portset = normalise_ports(contributions, where=where, truncate=True)
            cut.add(portset)
            return portset

    return normalise, cut


def _truncated(out: CompiledRules, cut: set[Portset]) -> CompiledRules:
    out.truncated = sorted(p for p, ps in out.entries.items() if ps in cut)
    return out


Contributions = tuple[tuple[int, tuple[PortRange, ...]], ...]
Normalise = Callable[[Contributions, Prefix], Portset]


def _index(
    rules: Sequence[PeerRule],
) -> tuple[dict[Prefix, list[int]], list[frozenset[Prefix]], set[Prefix]]:
    """Rules by CIDR, each rule's except blocks (those inside its CIDR), every prefix."""
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
            e
            for e in map(Prefix.of, rule.excepts)
            if e.family == cidr.family
            and e.length >= cidr.length
            and e.ancestor(cidr.length) == cidr
        )
        excepts.append(inside)
        prefixes.update(inside)
    return by_cidr, excepts, prefixes


def _compile(rules: Sequence[PeerRule], normalise: Normalise) -> CompiledRules:
    if not any(r.excepts for r in rules):
        flat = _compile_plain(rules, normalise)
        if flat is not None:
            return flat
    by_cidr, excepts, prefixes = _index(rules)
    lengths: dict[int, list[int]] = {NP_FAMILY_IPV4: [], NP_FAMILY_IPV6: []}
    for p in prefixes:
        lengths[p.family].append(p.length)
    for fam in lengths:
        lengths[fam] = sorted(set(lengths[fam]))
    any_excepts = any(excepts)
    # Many prefixes see the same contributions: normalise each distinct set once.
    normalised: dict[Contributions, Portset] = {}
    kept: dict[Prefix, Portset] = {}
    for p in sorted(prefixes):
        ancestors = [p.ancestor(n) for n in lengths[p.family] if n <= p.length]
        anc_set = set(ancestors) if any_excepts else None
        contributions = tuple(
            (rules[i].policy_id, rules[i].ports)
            for anc in ancestors
            for i in by_cidr.get(anc, ())
            if anc_set is None or not excepts[i] & anc_set
        )
        portset = normalised.get(contributions)
        if portset is None:
            portset = normalise(contributions, p) if contributions else NOTHING
            normalised[contributions] = portset
        nearest = nearest_kept(p, lengths[p.family], kept)
        if nearest == portset or (nearest is None and portset.allows_nothing):
            continue
        kept[p] = portset
    return CompiledRules(entries=kept)


def _compile_plain(rules: Sequence[PeerRule], normalise: Normalise) -> CompiledRules | None:
    """Rules without excepts whose CIDRs do not contain one another (nearly every
    policy): each prefix keeps exactly the rules given for it, in one pass. None if some
    CIDR contains another (the general path then computes what each inherits)."""
    by_cidr: dict[Prefix, list[tuple[int, tuple[PortRange, ...]]]] = {}
    of = Prefix.of
    for rule in rules:
        cidr = rule.cidr if type(rule.cidr) is Prefix else of(rule.cidr)
        contribution = (rule.policy_id, rule.ports)
        found = by_cidr.get(cidr)
        if found is None:
            by_cidr[cidr] = [contribution]
        else:
            found.append(contribution)
    return _plain(by_cidr, normalise)


def _plain(
    by_cidr: dict[Prefix, list[tuple[int, tuple[PortRange, ...]]]], normalise: Normalise
) -> CompiledRules | None:
    """The entries of prefixes that do not contain one another, each with exactly its
    own contributions; None if some prefix contains another."""
    lengths: dict[int, set[int]] = {NP_FAMILY_IPV4: set(), NP_FAMILY_IPV6: set()}
    for p in by_cidr:
        lengths[p.family].add(p.length)
    prefixes = by_cidr.keys()
    if _nested(prefixes, {fam: sorted(ls) for fam, ls in lengths.items()}):
        return None
    normalised: dict[Contributions, Portset] = {}
    kept: dict[Prefix, Portset] = {}
    for p, found in by_cidr.items():
        contributions = tuple(found)
        portset = normalised.get(contributions)
        if portset is None:
            portset = normalise(contributions, p)
            normalised[contributions] = portset
        if not portset.allows_nothing:
            kept[p] = portset
    return CompiledRules(entries=kept)


def _nested(prefixes: Collection[Prefix], lengths: dict[int, list[int]]) -> bool:
    """Whether some prefix contains another. Only prefixes longer than their family's
    shortest are checked, against the shorter lengths present: ipBlocks of one or a few
    sizes that do not overlap (the common case) cost little more than a pass."""
    shortest = {fam: ls[0] for fam, ls in lengths.items() if ls}
    width = _WIDTH
    for family, length, value in prefixes:
        if length == shortest[family]:
            continue
        w = width[family]
        for n in lengths[family]:
            if n >= length:
                break
            shift = w - n
            if Prefix(family, n, (value >> shift) << shift) in prefixes:
                return True
    return False


def nearest_kept(p: Prefix, lengths: list[int], kept: dict[Prefix, Portset]) -> Portset | None:
    """The port set of the longest kept prefix containing ``p`` (what ``p`` inherits)."""
    for n in reversed(lengths):
        if n < p.length and (a := p.ancestor(n)) in kept:
            return kept[a]
    return None
