"""A PolicyEndpoint's ``ingress``/``egress`` entries as the agent keeps them: validated
once, then packed (a node may hold hundreds of thousands of CIDRs, for months).

:func:`parse_packed` validates and packs in one pass. The entries that nearly every
object holds (a ``cidr`` string without ``except``; ``ports`` of integer numbers, or
none) go from the text to the packed bytes directly (1,250 objects of 200 entries:
0.3 s, against 0.66-1.0 s validating each entry into a Rule first). Whatever that path
is not certain of (an except, spaces around the text, a port written as a string, any
error) goes through common.policyendpoint's own validation, entry by entry, which
decides and words the error. The result is the same either way
(tests/unit/test_rulepack.py checks that against parse_rule on generated entries).
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from bpf import layout as lay
from bpf.layout import NP_FAMILY_IPV4, NP_FAMILY_IPV6
from bpf.ruleset import PeerRule, PortRange, Prefix
from common.cidr import Cidr
from common.policyendpoint import PortSpec, Rule, parse_ports, parse_rule

_PACKED = struct.Struct(">BB16s")  # family, prefix length, address (big-endian, 16 bytes)
_PROTOCOLS = lay.PROTOCOL_NUMBERS


@dataclass(frozen=True, slots=True)
class PackedRules:
    """One direction's peer rules, compact: a node keeps every PolicyEndpoint about its
    pods, often hundreds of thousands of CIDRs, for as long as they apply. Rules without
    ``except`` (nearly all) are grouped by their port list, their prefixes packed 18
    bytes each (a PeerRule of Prefix objects takes about 190); the rare rules with
    excepts are kept as they are. Iterating yields PeerRules, built on the fly."""

    groups: tuple[tuple[tuple[PortRange, ...], bytes], ...] = ()
    others: tuple[PeerRule, ...] = ()

    def __iter__(self) -> Iterator[PeerRule]:
        return self.rules()

    def rules(self, policy_id: int = 0) -> Iterator[PeerRule]:
        """The rules, attributed to ``policy_id``."""
        new = tuple.__new__  # what the named tuples' constructors do, without their frame
        for _, ports, prefixes in self.grouped(policy_id):
            for prefix in prefixes:
                yield new(PeerRule, (prefix, (), ports, policy_id))
        for r in self.others:
            yield r._replace(policy_id=policy_id) if policy_id else r

    def grouped(self, policy_id: int) -> Iterator[tuple[int, tuple[PortRange, ...], list[Prefix]]]:
        """The rules without excepts, as bpf.ruleset.compile_grouped takes them:
        (``policy_id``, ports, prefixes) per port list."""
        from_bytes = int.from_bytes
        new = tuple.__new__  # what Prefix's constructor does, without its frame
        for ports, packed in self.groups:
            prefixes = [
                new(Prefix, (family, length, from_bytes(raw, "big")))
                for family, length, raw in _PACKED.iter_unpack(packed)
            ]
            yield policy_id, ports, prefixes

    def __len__(self) -> int:
        return sum(len(p) // _PACKED.size for _, p in self.groups) + len(self.others)

    def weight(self) -> int:
        """Port rules counted per CIDR (what compiling them costs, roughly)."""
        return sum(len(p) // _PACKED.size * max(1, len(ports)) for ports, p in self.groups) + sum(
            max(1, len(r.ports)) * (1 + len(r.excepts)) for r in self.others
        )


def _prefix(c: Cidr) -> Prefix:
    return Prefix(NP_FAMILY_IPV4 if c.version == 4 else NP_FAMILY_IPV6, c.length, c.value)


@functools.lru_cache(maxsize=4096)
def port_ranges(ports: tuple[PortSpec, ...]) -> tuple[PortRange, ...]:
    """Validated port specs as the datapath's ranges (interned: few distinct lists)."""
    return tuple(
        PortRange(_PROTOCOLS[p.protocol], 0, 65535)
        if p.port is None
        else PortRange(_PROTOCOLS[p.protocol], p.port, p.end_port or p.port)
        for p in ports
    )


class _Packer:
    """Rules appended in order, grouped by port list as PackedRules keeps them."""

    __slots__ = ("groups", "others")

    def __init__(self) -> None:
        self.groups: dict[tuple[PortRange, ...], bytearray] = {}
        self.others: list[PeerRule] = []

    def group(self, ports: tuple[PortRange, ...]) -> bytearray:
        group = self.groups.get(ports)
        if group is None:
            group = self.groups[ports] = bytearray()
        return group

    def add(self, r: Rule) -> None:
        ports = port_ranges(r.ports) if r.ports else ()
        c = r.cidr
        if r.excepts:
            self.others.append(PeerRule(_prefix(c), tuple(map(_prefix, r.excepts)), ports))
            return
        self.group(ports).extend(
            _PACKED.pack(
                NP_FAMILY_IPV4 if c.version == 4 else NP_FAMILY_IPV6,
                c.length,
                c.value.to_bytes(16, "big"),
            )
        )

    def done(self) -> PackedRules:
        return PackedRules(tuple((k, bytes(v)) for k, v in self.groups.items()), tuple(self.others))


def pack(rules: Iterable[Rule]) -> PackedRules:
    """Validated rules, packed."""
    packer = _Packer()
    for r in rules:
        packer.add(r)
    return packer.done()


# The packed bytes' head (family, length and, for IPv4, the 12 zero bytes before the
# address) and the mask that clears host bits, per prefix length.
_HEAD4 = tuple(bytes((NP_FAMILY_IPV4, n)) + bytes(12) for n in range(33))
_HEAD6 = tuple(bytes((NP_FAMILY_IPV6, n)) for n in range(129))
_KEEP4 = tuple(((1 << n) - 1) << (32 - n) for n in range(33))
_KEEP6 = tuple(((1 << n) - 1) << (128 - n) for n in range(129))


def _packed_cidr(text: str) -> bytes | None:
    """``text`` packed, or None where common.cidr.parse must decide (it strips spaces,
    and words the errors). Accepts only what that accepts, with the same result."""
    addr, sep, length_text = text.partition("/")
    v6 = ":" in addr
    try:
        raw = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, addr)
    except OSError:
        return None
    bits = 128 if v6 else 32
    if not sep:
        length = bits
    elif length_text.isascii() and length_text.isdigit():
        length = int(length_text)
        if length > bits:
            return None
    else:
        return None
    head = (_HEAD6 if v6 else _HEAD4)[length]
    if length == bits:
        return head + raw
    value = int.from_bytes(raw, "big") & (_KEEP6 if v6 else _KEEP4)[length]
    return head + value.to_bytes(16 if v6 else 4, "big")


# Port lists already validated, by their raw form (protocol, port, endPort per item, ints
# only: a bool or a float compares equal to an int, and must still be refused). Bounded:
# cleared when full; an object's lists are few and repeat across objects.
_PORT_LISTS: dict[tuple[tuple[Any, Any, Any], ...], tuple[PortRange, ...]] = {}
_PORT_LISTS_MAX = 4096


_TEXT = (type(None), str)  # only these: hashable, and never equal to another type's value
_NUMBER = (type(None), int)


def _port_list_key(ports: Any) -> tuple[tuple[Any, Any, Any], ...] | None:
    if type(ports) is not list:
        return None
    key = []
    for p in ports:
        if type(p) is not dict:
            return None
        item = (p.get("protocol"), p.get("port"), p.get("endPort"))
        if (
            type(item[0]) not in _TEXT
            or type(item[1]) not in _NUMBER
            or type(item[2]) not in _NUMBER
        ):
            return None
        key.append(item)
    return tuple(key)


def _port_list(ports: Any, where: str) -> tuple[PortRange, ...]:
    key = _port_list_key(ports)
    if key is not None:
        seen = _PORT_LISTS.get(key)
        if seen is not None:
            return seen
    ranges = port_ranges(parse_ports(ports, where))
    if key is not None:
        if len(_PORT_LISTS) >= _PORT_LISTS_MAX:
            _PORT_LISTS.clear()
        _PORT_LISTS[key] = ranges
    return ranges


def parse_packed(entries: Any, where: str) -> PackedRules:
    """Validate and pack a list of entries at ``where`` (``spec.ingress``): what packing
    common.policyendpoint.parse_rule's rules (at ``<where>.<i>``) in order gives, and
    the same ValueError for the first offending entry. FQDN entries (``domainName``
    without ``cidr``) are skipped."""
    if entries is None:
        return PackedRules()
    if not isinstance(entries, list):
        raise ValueError(f"{where}: must be a list")
    packer = _Packer()
    group = None  # (port ranges, their bytes) of the previous fast entry
    for i, entry in enumerate(entries):
        packed = None
        if type(entry) is dict:
            text = entry.get("cidr")
            if type(text) is str and not entry.get("except"):
                packed = _packed_cidr(text)
        if packed is None:  # the exact path decides, and words any error
            rule = parse_rule(entry, f"{where}.{i}")
            if rule is not None:
                packer.add(rule)
            continue
        ports = entry.get("ports")
        ranges = _port_list(ports, f"{where}.{i}.ports") if ports else ()
        if group is None or ranges is not group[0]:
            group = (ranges, packer.group(ranges))
        group[1].extend(packed)
    return packer.done()
