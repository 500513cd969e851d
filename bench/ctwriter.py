"""Creating and deleting kernel conntrack entries in batches (ctnetlink), for the
benchmarks: kernel flows without traffic. The product only reads the table
(conntrack.ctnetlink.scan)."""

from __future__ import annotations

import socket
import struct

from common.nlmsg import NLA_F_NESTED, NLATTR, NLM_F_REQUEST, NLMSG, NLMSG_ERROR
from conntrack.ctnetlink import (
    _PORTED,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_IP_V6_DST,
    CTA_IP_V6_SRC,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_TIMEOUT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    IPCTNL_MSG_CT_NEW,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    _request,
    _socket,
)


def _nest(kind: int, payload: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, payload)


def _attr(kind: int, payload: bytes) -> bytes:
    raw = NLATTR.pack(4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _tuple_attr(
    kind: int, src: bytes, dst: bytes, proto: int, sport: int, dport: int, family: int
) -> bytes:
    if family == socket.AF_INET:
        ip = _attr(CTA_IP_V4_SRC, src[:4]) + _attr(CTA_IP_V4_DST, dst[:4])
    else:
        ip = _attr(CTA_IP_V6_SRC, src) + _attr(CTA_IP_V6_DST, dst)
    pr = _attr(CTA_PROTO_NUM, bytes([proto]))
    if proto in _PORTED:
        pr += _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport))
        pr += _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))
    return _nest(kind, _nest(CTA_TUPLE_IP, ip) + _nest(CTA_TUPLE_PROTO, pr))


class Writer:
    """Creates or deletes kernel conntrack entries in batches (many messages per send)."""

    def __init__(self) -> None:
        self.sock = _socket()
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _entry(
        self,
        msg: int,
        flags: int,
        family: int,
        src: bytes,
        dst: bytes,
        proto: int,
        sport: int,
        dport: int,
        timeout: int,
    ) -> bytes:
        payload = _tuple_attr(CTA_TUPLE_ORIG, src, dst, proto, sport, dport, family) + _tuple_attr(
            CTA_TUPLE_REPLY, dst, src, proto, dport, sport, family
        )
        if msg == IPCTNL_MSG_CT_NEW:
            payload += _attr(CTA_TIMEOUT, struct.pack("!I", timeout))
        self.seq += 1
        return _request(msg, flags, family, payload, seq=self.seq)

    def send(
        self,
        msg: int,
        entries: list[tuple[int, bytes, bytes, int, int, int]],
        *,
        timeout: int = 600,
    ) -> int:
        """Each entry: (family, src16, dst16, proto, sport, dport). Returns failures."""
        flags = NLM_F_REQUEST | NLM_F_ACK
        if msg == IPCTNL_MSG_CT_NEW:
            flags |= NLM_F_CREATE | NLM_F_EXCL
        failures = 0
        for i in range(0, len(entries), 256):
            chunk = entries[i : i + 256]
            self.sock.send(b"".join(self._entry(msg, flags, *e, timeout=timeout) for e in chunk))
            acks = 0
            while acks < len(chunk):
                data = self.sock.recv(1 << 20)
                off = 0
                while off + NLMSG.size <= len(data):
                    length, mtype, *_ = NLMSG.unpack_from(data, off)
                    if mtype == NLMSG_ERROR:
                        acks += 1
                        if struct.unpack_from("=i", data, off + NLMSG.size)[0]:
                            failures += 1
                    off += (length + 3) & ~3
        return failures
