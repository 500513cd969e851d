"""ctypes mirrors of ``bpf/np.h``: every struct and constant that crosses the kernel boundary.

Hand-written on purpose (readable, greppable); ``tests/unit/test_layout.py`` checks every
struct's size and field offsets against the BTF of the compiled object and every constant
against the header, so a drift fails the suite instead of corrupting maps.
"""

from __future__ import annotations

import ctypes
import ipaddress
import struct
from typing import Any, ClassVar

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64

# ---- limits ---------------------------------------------------------------------------
NP_MAX_PODS = 8192
NP_MAX_TRIES = 32768
NP_MAX_PORTSETS = 65536
NP_MAX_PORT_RULES = 256
NP_MAX_POLICIES = 65536
NP_CT_DEFAULT_ENTRIES = 524288
NP_CT_MIN_ENTRIES = 32768
NP_CT_MAX_ENTRIES = 1048576
NP_CT_SYN_IDLE_NS = 10 * 1_000_000_000
NP_CT_LEASE_NS = 60 * 1_000_000_000
NP_CT_F_CLOSING = 1
NP_EVENTS_DEFAULT_BYTES = 4 * 1024 * 1024
NP_FRAG_ENTRIES = 8192
NP_HOST_ADDRS = 64
NP_MAX_LEARNED = 65536
NP_INPUTS_DIGEST_LEN = 32
NP_SWEEP_BATCH = 4096

# ---- enumerations ---------------------------------------------------------------------
NP_STATE_POLICIES_APPLIED = 0
NP_STATE_DEFAULT_ALLOW = 1
NP_STATE_DEFAULT_DENY = 2

NP_DIR_INGRESS = 0
NP_DIR_EGRESS = 1

NP_VERDICT_DENY = 0
NP_VERDICT_ALLOW = 1

NP_REASON_DEFAULT_ALLOW = 1
NP_REASON_DEFAULT_DENY = 2
NP_REASON_RULE = 3
NP_REASON_NO_PEER_MATCH = 4
NP_REASON_NO_PORT_MATCH = 5
NP_REASON_HOST = 6
NP_REASON_MISSING_TRIE = 7

NP_TIER_ERROR = 0
NP_TIER_ADMIN = 1
NP_TIER_NETWORK_POLICY = 2
NP_TIER_BASELINE = 3
NP_TIER_DEFAULT = 4

NP_PROTO_TCP = 6
NP_PROTO_UDP = 17
NP_PROTO_SCTP = 132
NP_PROTO_ANY = 254

NP_FAMILY_IPV4 = 4
NP_FAMILY_IPV6 = 6

NP_LPM_FAMILY_BITS = 8

NP_PORTSET_NONE = 0
NP_LPM_INLINE = 1 << 31
NP_LPM_INLINE_POLICY_MASK = (1 << 22) - 1
NP_TRIE_NONE = 0
NP_PORTSET_F_ANY = 1 << 0
NP_PORTSET_F_OTHER = 1 << 1
NP_PORTSET_F_RULES_TCP = 1 << 4
NP_PORTSET_F_RULES_UDP = 1 << 5
NP_PORTSET_F_RULES_SCTP = 1 << 6

NP_POD_F_LEARNED = 1 << 0

NP_CFG_EMIT_DENY = 1 << 0
NP_CFG_EMIT_ALLOW = 1 << 1

STATE_NAMES = {
    NP_STATE_POLICIES_APPLIED: "POLICIES_APPLIED",
    NP_STATE_DEFAULT_ALLOW: "DEFAULT_ALLOW",
    NP_STATE_DEFAULT_DENY: "DEFAULT_DENY",
}
REASON_NAMES = {
    NP_REASON_DEFAULT_ALLOW: "default-allow",
    NP_REASON_DEFAULT_DENY: "default-deny",
    NP_REASON_RULE: "rule",
    NP_REASON_NO_PEER_MATCH: "no-peer-match",
    NP_REASON_NO_PORT_MATCH: "no-port-match",
    NP_REASON_HOST: "host",
    NP_REASON_MISSING_TRIE: "missing-trie",
}
# the reference's flow-log and CloudWatch values of "Tier"
TIER_NAMES = {
    NP_TIER_ERROR: "ERROR",
    NP_TIER_ADMIN: "ADMIN",
    NP_TIER_NETWORK_POLICY: "NETWORK_POLICY",
    NP_TIER_BASELINE: "BASELINE",
    NP_TIER_DEFAULT: "DEFAULT",
}
DIRECTION_NAMES = {NP_DIR_INGRESS: "ingress", NP_DIR_EGRESS: "egress"}
PROTOCOL_NUMBERS = {"TCP": NP_PROTO_TCP, "UDP": NP_PROTO_UDP, "SCTP": NP_PROTO_SCTP}
PROTOCOL_NAMES = {
    NP_PROTO_TCP: "TCP",
    NP_PROTO_UDP: "UDP",
    NP_PROTO_SCTP: "SCTP",
    NP_PROTO_ANY: "ANY",
    1: "ICMP",
    58: "ICMPv6",
}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Struct(ctypes.Structure):
    """Base for the mirrors: byte conversion helpers shared by every struct."""

    _c_name: ClassVar[str]

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> Struct:
        return cls.from_buffer_copy(data)


_CODES: dict[type, str] = {u8: "B", u16: "H", u32: "I", u64: "Q"}


def packer(mirror: type[Struct]) -> struct.Struct:
    """A :class:`struct.Struct` with exactly the mirror's layout (little-endian, every
    gap and ``pad*`` field as padding, byte arrays as ``bytes``): for hot paths that
    unpack many records at once. Derived, never written by hand, so it follows the
    mirror (which the BTF test checks)."""
    fmt, at = "<", 0
    for field in mirror._fields_:
        name, ctype = field[0], field[1]
        off = getattr(mirror, name).offset
        if off > at:
            fmt += f"{off - at}x"
        size = ctypes.sizeof(ctype)
        kind: Any = ctype
        if name.startswith("pad"):
            fmt += f"{size}x"
        elif issubclass(kind, ctypes.Array):
            elem, length = kind._type_, kind._length_
            # bytes and strings as bytes; arrays of structs as their raw bytes
            fmt += f"{length}{_CODES[elem]}" if elem in _CODES and elem is not u8 else f"{size}s"
        else:
            fmt += _CODES[kind]
        at = off + size
    if ctypes.sizeof(mirror) > at:
        fmt += f"{ctypes.sizeof(mirror) - at}x"
    out = struct.Struct(fmt)
    assert out.size == ctypes.sizeof(mirror), (mirror, fmt)
    return out


def offset(mirror: type[Struct], field: str) -> int:
    """Byte offset of ``field`` in the mirror (for reading one field of raw bytes)."""
    return int(getattr(mirror, field).offset)


def addr_bytes(address: Address) -> bytes:
    """16 bytes as stored in maps: IPv4 in the first 4 bytes, the rest zero."""
    return address.packed.ljust(16, b"\0")


def addr_family(address: Address) -> int:
    return NP_FAMILY_IPV4 if address.version == 4 else NP_FAMILY_IPV6


def addr_from(raw: bytes, family: int) -> Address:
    if family == NP_FAMILY_IPV4:
        return ipaddress.IPv4Address(bytes(raw[:4]))
    return ipaddress.IPv6Address(bytes(raw[:16]))


class NpPod(Struct):
    _c_name = "np_pod"
    _fields_ = [
        ("pod_id", u32),
        ("ingress_trie", u32),
        ("egress_trie", u32),
        ("ingress_state", u8),
        ("egress_state", u8),
        ("flags", u8),
        ("pad", u8),
    ]


class NpLpmKey(Struct):
    _c_name = "np_lpm_key"
    _fields_ = [
        ("prefixlen", u32),
        ("family", u8),
        ("addr", u8 * 16),
        ("pad", u8 * 3),
    ]


class NpLpmValue(Struct):
    _c_name = "np_lpm_value"
    _fields_ = [("portset_id", u32)]


class NpPortRule(Struct):
    _c_name = "np_port_rule"
    _fields_ = [
        ("policy_id", u32),
        ("start_port", u16),
        ("end_port", u16),
        ("protocol", u8),
        ("deny", u8),
        ("tier", u8),
        ("reason", u8),
    ]


class NpPortset(Struct):
    _c_name = "np_portset"
    _fields_ = [
        ("count", u32),
        ("flags", u32),
        ("other_policy", u32),
        ("other_verdict", u8),
        ("other_tier", u8),
        ("other_reason", u8),
        ("pad", u8),
        ("rules", NpPortRule * NP_MAX_PORT_RULES),
    ]


class NpCtKey(Struct):
    _c_name = "np_ct_key"
    _fields_ = [
        ("pod_addr", u8 * 16),
        ("peer_addr", u8 * 16),
        ("pod_port", u16),
        ("peer_port", u16),
        ("protocol", u8),
        ("family", u8),
        ("pad", u8 * 2),
        ("ifindex", u32),
    ]


class NpCtValue(Struct):
    _c_name = "np_ct_value"
    _fields_ = [
        ("last_seen_ns", u64),
        ("created_ns", u64),
        ("pod_id", u32),
        ("origin", u8),
        ("reason", u8),
        ("flags", u8),
        ("pad", u8),
    ]


class NpFragKey(Struct):
    _c_name = "np_frag_key"
    _fields_ = [
        ("pod_addr", u8 * 16),
        ("peer_addr", u8 * 16),
        ("id", u32),
        ("ifindex", u32),
        ("protocol", u8),
        ("family", u8),
        ("pad", u8 * 2),
    ]


class NpFragValue(Struct):
    _c_name = "np_frag_value"
    _fields_ = [("pod_port", u16), ("peer_port", u16)]


class NpLearnedKey(Struct):
    _c_name = "np_learned_key"
    _fields_ = [("ifindex", u32), ("family", u8), ("pad", u8 * 3), ("addr", u8 * 16)]


class NpLearnedValue(Struct):
    _c_name = "np_learned_value"
    _fields_ = [("expires_ns", u64), ("decision", u32), ("pad", u32)]


class NpPodInputs(Struct):
    _c_name = "np_pod_inputs"
    _fields_ = [("digest", u8 * NP_INPUTS_DIGEST_LEN)]


class NpSweepArgs(Struct):
    _c_name = "np_sweep_args"
    _fields_ = [
        ("started_ns", u64),
        ("old_enough_ns", u64),
        ("count", u32),
        ("removed", u32),
        ("touched", u32),
        ("young", u32),
        ("gone", u32),
        ("pad", u32),
    ]


class NpAddr(Struct):
    _c_name = "np_addr"
    _fields_ = [("addr", u8 * 16), ("family", u8), ("pad", u8 * 3)]


class NpHostFilter(Struct):
    _c_name = "np_host_filter"
    _fields_ = [("bits", u64 * 4), ("ready", u32), ("pad", u32)]


class NpPodDrops(Struct):
    _c_name = "np_pod_drops"
    _fields_ = [
        ("ingress_packets", u64),
        ("ingress_bytes", u64),
        ("egress_packets", u64),
        ("egress_bytes", u64),
    ]


class NpConfig(Struct):
    _c_name = "np_config"
    _fields_ = [("flags", u32), ("pad", u32)]


class NpStats(Struct):
    _c_name = "np_stats"
    _fields_ = [
        ("packets_allowed", u64),
        ("packets_denied", u64),
        ("ingress_denied_packets", u64),
        ("ingress_denied_bytes", u64),
        ("egress_denied_packets", u64),
        ("egress_denied_bytes", u64),
        ("ct_hits", u64),
        ("ct_inserts", u64),
        ("ct_insert_errors", u64),
        ("events_lost", u64),
        ("unknown_pod", u64),
        ("missing_trie", u64),
        ("fragments_untracked", u64),
        ("malformed", u64),
        ("ct_rejudged", u64),
        ("ct_revoked", u64),
    ]


class NpPodMeta(Struct):
    _c_name = "np_pod_meta"
    _fields_ = [
        ("namespace_", ctypes.c_char * 64),
        ("name", ctypes.c_char * 256),
        ("uid", ctypes.c_char * 40),
    ]


class NpPolicyMeta(Struct):
    _c_name = "np_policy_meta"
    _fields_ = [
        ("namespace_", ctypes.c_char * 64),
        ("name", ctypes.c_char * 256),
    ]


class NpEvent(Struct):
    _c_name = "np_event"
    _fields_ = [
        ("timestamp_ns", u64),
        ("pod_addr", u8 * 16),
        ("peer_addr", u8 * 16),
        ("pod_port", u16),
        ("peer_port", u16),
        ("protocol", u8),
        ("family", u8),
        ("verdict", u8),
        ("direction", u8),
        ("reason", u8),
        ("tier", u8),
        ("pad", u8 * 2),
        ("pod_id", u32),
        ("ifindex", u32),
        ("policy_id", u32),
        ("packet_len", u32),
        ("pad2", u32),
    ]


MIRRORS: tuple[type[Struct], ...] = (
    NpPod,
    NpLpmKey,
    NpLpmValue,
    NpPortRule,
    NpPortset,
    NpCtKey,
    NpCtValue,
    NpFragKey,
    NpFragValue,
    NpLearnedKey,
    NpLearnedValue,
    NpPodInputs,
    NpSweepArgs,
    NpAddr,
    NpHostFilter,
    NpPodDrops,
    NpConfig,
    NpStats,
    NpPodMeta,
    NpPolicyMeta,
    NpEvent,
)

# ---- names of the object's maps and programs ------------------------------------------
OBJECT_FILE = "policy.bpf.o"
PROG_INGRESS = "np_ingress"
PROG_EGRESS = "np_egress"
MAP_PODS = "np_pods"
MAP_RULES = "np_rules"
MAP_PORTSETS = "np_portsets"
MAP_CT = "np_ct"
MAP_FRAGS = "np_frags"
MAP_HOST_ADDRS = "np_host_addrs"
MAP_HOST_FILTER = "np_host_filter"
MAP_CONFIG = "np_config"
MAP_STATS = "np_stats"
MAP_EVENTS = "np_events"
MAP_POD_META = "np_pod_meta"
MAP_POD_DROPS = "np_pod_drops"
MAP_POLICIES = "np_policies"
MAP_LEARNED = "np_learned"
MAP_POD_INPUTS = "np_pod_inputs"
# the conntrack cleaner's object (sweep.bpf.c; it reuses np_ct by its pin)
SWEEP_OBJECT_FILE = "sweep.bpf.o"
SWEEP_PROG = "np_sweep"
SWEEP_KEYS_MAP = "np_sweep_keys"
