"""Reference semantics of peer rules, straight from the definition (no flattening).

Allowed on (protocol, port) iff some rule contains the address, none of that rule's
excepts contains it, and a port entry matches. An unknown port (later fragment) is
allowed iff every port of the protocol is allowed. Shares no code with bpf.ruleset.
"""

from __future__ import annotations

import ipaddress

from bpf.layout import NP_PROTO_ANY
from bpf.ruleset import PeerRule, Prefix

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _net(n: Network | Prefix) -> Network:
    return n.network() if isinstance(n, Prefix) else n


def _applies(rule: PeerRule, addr: Address) -> bool:
    cidr = _net(rule.cidr)
    if addr.version != cidr.version or addr not in cidr:
        return False
    return not any(_net(e).version == addr.version and addr in _net(e) for e in rule.excepts)


def reference_allows(rules: list[PeerRule], addr: Address, protocol: int, port: int | None) -> bool:
    intervals: list[tuple[int, int]] = []
    for rule in rules:
        if not _applies(rule, addr):
            continue
        if not rule.ports:
            return True
        for p in rule.ports:
            if p.protocol == NP_PROTO_ANY:
                return True
            if p.protocol != protocol:
                continue
            if port is not None and p.start <= port <= p.end:
                return True
            intervals.append((p.start, p.end))
    if port is not None:
        return False
    reach = 0
    for start, end in sorted(intervals):
        if start > reach:
            return False
        reach = max(reach, end + 1)
    return reach > 65535
