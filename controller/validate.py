"""NetworkPolicy validation, as the API server applies it (networking/v1), for the fields
the resolver reads: a policy that passes resolves to PolicyEndpoints the agent accepts.

On a real cluster the API server has already refused what this refuses; the resolver
checks anyway (a policy written before a validation existed, a fake or lax API server,
a direct store write) and names the first offending field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

PROTOCOLS = ("TCP", "UDP", "SCTP")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# IANA_SVC_NAME: 1-15 lowercase alphanumerics or '-', at least one letter, no '--',
# not starting or ending with '-'
_SVC_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


class PolicyInvalid(ValueError):  # noqa: N818 (a condition of the input)
    """``field: problem``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")


def validate_spec(spec: Any) -> None:
    """Raise PolicyInvalid naming the first field the API server would refuse."""
    if not isinstance(spec, Mapping):
        raise PolicyInvalid("spec", "must be an object")
    _selector(spec.get("podSelector"), "spec.podSelector")
    types = spec.get("policyTypes")
    if types is not None:
        _list(types, "spec.policyTypes")
        for i, t in enumerate(types):
            if t not in ("Ingress", "Egress"):
                raise PolicyInvalid(f"spec.policyTypes[{i}]", f"{t!r} is not Ingress or Egress")
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        rules = spec.get(direction)
        if rules is None:
            continue
        _list(rules, f"spec.{direction}")
        for i, rule in enumerate(rules):
            where = f"spec.{direction}[{i}]"
            if not isinstance(rule, Mapping):
                raise PolicyInvalid(where, "must be an object")
            peers = rule.get(peers_key)
            if peers is not None:
                _list(peers, f"{where}.{peers_key}")
                for j, peer in enumerate(peers):
                    _peer(peer, f"{where}.{peers_key}[{j}]")
            ports = rule.get("ports")
            if ports is not None:
                _list(ports, f"{where}.ports")
                for j, port in enumerate(ports):
                    _port(port, f"{where}.ports[{j}]")


def _list(value: Any, where: str) -> None:
    if not isinstance(value, list):
        raise PolicyInvalid(where, "must be a list")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PolicyInvalid(where, f"{value!r} is not a string")
    return value


def _selector(sel: Any, where: str) -> None:
    if sel is None:
        return
    if not isinstance(sel, Mapping):
        raise PolicyInvalid(where, "must be an object")
    labels = sel.get("matchLabels")
    if labels is not None:
        if not isinstance(labels, Mapping):
            raise PolicyInvalid(f"{where}.matchLabels", "must be an object")
        for k, v in labels.items():
            _string(k, f"{where}.matchLabels")
            _string(v, f"{where}.matchLabels[{k}]")
    exprs = sel.get("matchExpressions")
    if exprs is None:
        return
    _list(exprs, f"{where}.matchExpressions")
    for i, e in enumerate(exprs):
        at = f"{where}.matchExpressions[{i}]"
        if not isinstance(e, Mapping):
            raise PolicyInvalid(at, "must be an object")
        if not _string(e.get("key"), f"{at}.key"):
            raise PolicyInvalid(f"{at}.key", "must not be empty")
        op = e.get("operator")
        if op not in OPERATORS:
            raise PolicyInvalid(f"{at}.operator", f"{op!r} is not one of {', '.join(OPERATORS)}")
        values = e.get("values")
        if values is not None:
            _list(values, f"{at}.values")
            for k, v in enumerate(values):
                _string(v, f"{at}.values[{k}]")
        if op in ("In", "NotIn") and not values:
            raise PolicyInvalid(f"{at}.values", f"must be non-empty for {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise PolicyInvalid(f"{at}.values", f"must be empty for {op}")


def _peer(peer: Any, where: str) -> None:
    if not isinstance(peer, Mapping):
        raise PolicyInvalid(where, "must be an object")
    block = peer.get("ipBlock")
    selectors = [k for k in ("podSelector", "namespaceSelector") if peer.get(k) is not None]
    if block is None:
        if not selectors:
            raise PolicyInvalid(where, "must specify a podSelector, namespaceSelector or ipBlock")
        for k in selectors:
            _selector(peer[k], f"{where}.{k}")
        return
    if selectors:
        raise PolicyInvalid(where, "may not specify both ipBlock and another peer")
    if not isinstance(block, Mapping):
        raise PolicyInvalid(f"{where}.ipBlock", "must be an object")
    cidr = _cidr(block.get("cidr"), f"{where}.ipBlock.cidr")
    excepts = block.get("except")
    if excepts is None:
        return
    _list(excepts, f"{where}.ipBlock.except")
    for i, e in enumerate(excepts):
        at = f"{where}.ipBlock.except[{i}]"
        net = _cidr(e, at)
        if not (net.version == cidr.version and net.prefixlen > cidr.prefixlen
                and int(cidr.network_address) <= int(net.network_address)
                <= int(cidr.broadcast_address)):
            raise PolicyInvalid(at, f"{e} must be a strict subset of {block['cidr']}")


def _cidr(value: Any, where: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = _string(value, where)
    if "/" not in text:
        raise PolicyInvalid(where, f"{text!r} is not a CIDR (address/length)")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise PolicyInvalid(where, f"{text!r} is not a valid CIDR") from None


def _port(port: Any, where: str) -> None:
    if not isinstance(port, Mapping):
        raise PolicyInvalid(where, "must be an object")
    protocol = port.get("protocol")
    if protocol is not None and protocol not in PROTOCOLS:
        raise PolicyInvalid(f"{where}.protocol", f"{protocol!r} is not TCP, UDP or SCTP")
    number = port.get("port")
    end = port.get("endPort")
    if number is None:
        if end is not None:
            raise PolicyInvalid(f"{where}.endPort", "requires a numeric port")
        return
    if isinstance(number, str) and number.isdigit():
        number = int(number)  # lenient: a quoted number is read as the number
    if isinstance(number, str):
        if not _SVC_NAME.match(number):
            raise PolicyInvalid(f"{where}.port", f"{number!r} is not a valid port name")
        if end is not None:
            raise PolicyInvalid(f"{where}.endPort", "may not be used with a named port")
        return
    if not _is_int(number) or not 1 <= number <= 65535:
        raise PolicyInvalid(f"{where}.port", f"{number!r} is not a port (1-65535)")
    if end is not None and (not _is_int(end) or not number <= end <= 65535):
        raise PolicyInvalid(f"{where}.endPort", f"{end!r} is not a port from {number} to 65535")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
