"""NetworkPolicy validation, as the API server applies it (networking/v1), for the fields
the resolver reads: a policy that passes resolves to PolicyEndpoints the agent accepts.

On a real cluster the API server has already refused what this refuses; the resolver
checks anyway (a policy written before a validation existed, a fake or lax API server,
a direct store write) and names the first offending field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from common.cidr import Cidr
from common.cidr import parse as parse_cidr
from common.dnsnames import DOMAIN_NAME
from common.echo import bounded

PROTOCOLS = ("TCP", "UDP", "SCTP")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# IANA_SVC_NAME: 1-15 lowercase alphanumerics or '-', at least one letter, no '--',
# not starting or ending with '-'
_SVC_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


class InvalidPolicy(ValueError):  # noqa: N818 (names the input, as the API would)
    """A NetworkPolicy the API server's validation would refuse: ``field: problem``
    (the resolver prefixes the policy's name)."""

    def __init__(self, field: str, problem: str = "") -> None:
        super().__init__(f"{field}: {problem}" if problem else field)


def domain_names(value: Any, where: str) -> list[str]:
    """A ``domainNames`` list (1-25 names, the only wildcard a leading "*.")."""
    if not isinstance(value, list) or not 1 <= len(value) <= 25:
        raise InvalidPolicy(where, "1 to 25 names are required")
    out = []
    for i, n in enumerate(value):
        text = _string(n, f"{where}[{i}]")
        if not DOMAIN_NAME.match(text):
            raise InvalidPolicy(
                f"{where}[{i}]",
                f"{bounded(text)} is not a domain name (a leading '*.' is the only wildcard)",
            )
        out.append(text)
    return out


def validate_spec(spec: Any, *, application: bool = False) -> None:
    """Raise InvalidPolicy naming the first field the API server would refuse.
    ``application``: an ApplicationNetworkPolicy, whose egress peers may be
    ``domainNames`` (alone)."""
    if not isinstance(spec, Mapping):
        raise InvalidPolicy("spec", "must be an object")
    _selector(spec.get("podSelector"), "spec.podSelector")
    types = spec.get("policyTypes")
    if types is not None:
        _list(types, "spec.policyTypes")
        for i, t in enumerate(types):
            if t not in ("Ingress", "Egress"):
                raise InvalidPolicy(
                    f"spec.policyTypes[{i}]", f"{bounded(t)} is not Ingress or Egress"
                )
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for where, rule in _objects(spec.get(direction), f"spec.{direction}"):
            for at, peer in _objects(rule.get(peers_key), f"{where}.{peers_key}"):
                if "domainNames" in peer:
                    if not application or direction != "egress":
                        raise InvalidPolicy(
                            f"{at}.domainNames", "only in ApplicationNetworkPolicy egress rules"
                        )
                    if any(k in peer for k in ("ipBlock", "podSelector", "namespaceSelector")):
                        raise InvalidPolicy(at, "domainNames excludes every other peer field")
                    domain_names(peer["domainNames"], f"{at}.domainNames")
                    continue
                _peer(peer, at)
            for at, port in _objects(rule.get("ports"), f"{where}.ports"):
                _port(port, at)


def _objects(value: Any, where: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The items of an optional list of objects, each with its field path."""
    if value is None:
        return
    _list(value, where)
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise InvalidPolicy(f"{where}[{i}]", "must be an object")
        yield f"{where}[{i}]", item


def _list(value: Any, where: str) -> None:
    if not isinstance(value, list):
        raise InvalidPolicy(where, "must be a list")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidPolicy(where, f"{bounded(value)} is not a string")
    return value


def _selector(sel: Any, where: str) -> None:
    if sel is None:
        return
    if not isinstance(sel, Mapping):
        raise InvalidPolicy(where, "must be an object")
    labels = sel.get("matchLabels")
    if labels is not None:
        if not isinstance(labels, Mapping):
            raise InvalidPolicy(f"{where}.matchLabels", "must be an object")
        for k, v in labels.items():
            _string(k, f"{where}.matchLabels")
            _string(v, f"{where}.matchLabels[{k}]")
    exprs = sel.get("matchExpressions")
    for at, e in _objects(exprs, f"{where}.matchExpressions"):
        _expression(e, at)


def _expression(e: Mapping[str, Any], at: str) -> None:
    """One matchExpressions entry: a key, a known operator, values as it requires."""
    if not _string(e.get("key"), f"{at}.key"):
        raise InvalidPolicy(f"{at}.key", "must not be empty")
    op = e.get("operator")
    if op not in OPERATORS:
        raise InvalidPolicy(f"{at}.operator", f"{bounded(op)} is not one of {', '.join(OPERATORS)}")
    values = e.get("values")
    if values is not None:
        _list(values, f"{at}.values")
        for k, v in enumerate(values):
            _string(v, f"{at}.values[{k}]")
    if op in ("In", "NotIn") and not values:
        raise InvalidPolicy(f"{at}.values", f"must be non-empty for {op}")
    if op in ("Exists", "DoesNotExist") and values:
        raise InvalidPolicy(f"{at}.values", f"must be empty for {op}")


def _peer(peer: Mapping[str, Any], where: str) -> None:
    block = peer.get("ipBlock")
    selectors = [k for k in ("podSelector", "namespaceSelector") if peer.get(k) is not None]
    if block is None:
        if not selectors:
            raise InvalidPolicy(where, "must specify a podSelector, namespaceSelector or ipBlock")
        for k in selectors:
            _selector(peer[k], f"{where}.{k}")
        return
    if selectors:
        raise InvalidPolicy(where, "may not specify both ipBlock and another peer")
    if not isinstance(block, Mapping):
        raise InvalidPolicy(f"{where}.ipBlock", "must be an object")
    cidr = _cidr(block.get("cidr"), f"{where}.ipBlock.cidr")
    excepts = block.get("except")
    if excepts is None:
        return
    _list(excepts, f"{where}.ipBlock.except")
    for i, e in enumerate(excepts):
        at = f"{where}.ipBlock.except[{i}]"
        net = _cidr(e, at)
        if not (cidr.contains(net) and net.length > cidr.length):
            raise InvalidPolicy(at, f"{e} must be a strict subset of {block['cidr']}")


def _cidr(value: Any, where: str) -> Cidr:
    """A CIDR in address/length form (the API server refuses a bare address, which
    PolicyEndpoints allow)."""
    text = _string(value, where)
    if "/" not in text:
        raise InvalidPolicy(where, f"{bounded(text)} is not a CIDR (address/length)")
    try:
        return parse_cidr(text)
    except ValueError as exc:
        raise InvalidPolicy(where, str(exc)) from None


def _port(port: Mapping[str, Any], where: str) -> None:
    protocol = port.get("protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise InvalidPolicy(f"{where}.protocol", f"{bounded(protocol)} is not TCP, UDP or SCTP")
    number = port.get("port")
    end = port.get("endPort")
    if number is None:
        if end is not None:
            raise InvalidPolicy(f"{where}.endPort", "requires a numeric port")
        return
    if isinstance(number, str) and number.isdigit():
        number = int(number)  # lenient: a quoted number is read as the number
    if isinstance(number, str):
        if not _SVC_NAME.match(number):
            raise InvalidPolicy(f"{where}.port", f"{bounded(number)} is not a valid port name")
        if end is not None:
            raise InvalidPolicy(f"{where}.endPort", "may not be used with a named port")
        return
    if not _is_int(number) or not 1 <= number <= 65535:
        raise InvalidPolicy(f"{where}.port", f"{bounded(number)} is not a port (1-65535)")
    if end is not None and (not _is_int(end) or not number <= end <= 65535):
        raise InvalidPolicy(
            f"{where}.endPort", f"{bounded(end)} is not a port from {number} to 65535"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
