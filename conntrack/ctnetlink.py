"""The kernel's conntrack table over raw ctnetlink (NETLINK_NETFILTER), fast enough for
a million entries.

Only what the cleaner needs is decoded: for each entry, the original and the reply
tuple (addresses, protocol, ports). pyroute2's conntrack API decodes everything and runs
at ~3k entries/s here; this parser walks the attributes with ``struct.unpack_from``.
Blocking by design: callers run it in a thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import socket
import struct
import threading
from collections.abc import Iterator

from common.nlmsg import (
    NLA_F_NESTED,
    NLA_TYPE_MASK,
    NLATTR,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG,
    NLMSG_DONE,
    NLMSG_ERROR,
    attrs,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_DELETE = 2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_TIMEOUT = 7
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3

_PORTED = frozenset((6, 17, 132, 33, 136))  # TCP, UDP, SCTP, DCCP, UDPLITE

# (source address 16 bytes, destination address 16 bytes, protocol, sport, dport)
Tuple = tuple[bytes, bytes, int, int, int]


class CtnetlinkError(OSError):
    pass


def _tuple(buf: bytes, start: int, end: int) -> Tuple:
    src = dst = b""
    proto = sport = dport = 0
    for kind, s, e in attrs(buf, start, end):
        if kind == CTA_TUPLE_IP:
            for k2, s2, e2 in attrs(buf, s, e):
                if k2 in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = buf[s2:e2].ljust(16, b"\0")
                elif k2 in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = buf[s2:e2].ljust(16, b"\0")
        elif kind == CTA_TUPLE_PROTO:
            for k2, s2, _e2 in attrs(buf, s, e):
                if k2 == CTA_PROTO_NUM:
                    proto = buf[s2]
                elif k2 == CTA_PROTO_SRC_PORT:
                    sport = (buf[s2] << 8) | buf[s2 + 1]
                elif k2 == CTA_PROTO_DST_PORT:
                    dport = (buf[s2] << 8) | buf[s2 + 1]
    if proto not in _PORTED:
        sport = dport = 0  # ICMP ids are not ports; the datapath keys those flows port-less
    return src, dst, proto, sport, dport


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((0, 0))
    return sock


def _request(msg_type: int, flags: int, family: int, payload: bytes = b"", seq: int = 1) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + payload
    return (
        NLMSG.pack(NLMSG.size + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | msg_type, flags, seq, 0)
        + body
    )


# ---- the cleaner's fast path -------------------------------------------------------------
_V4_IP_NEST = 20  # nest header + two 8-byte IPv4 attributes
_V6_IP_NEST = 44  # nest header + two 20-byte IPv6 attributes
_ZERO_PORTS = b"\0\0\0\0"


def flow_key(src: bytes, dst: bytes, sport_be: bytes, dport_be: bytes, proto: int) -> bytes:
    """The key both sides use to recognise one direction of a flow: addresses (4 or 16
    bytes), big-endian ports (zero for port-less protocols), protocol."""
    ports = sport_be + dport_be if proto in _PORTED else _ZERO_PORTS
    return src + dst + ports + bytes((proto,))


_NEST = NLA_F_NESTED
_RAW_V4 = struct.Struct("=HH HH4s HH4s HH HHB3x HH2s2x HH2s2x")
_RAW_V6 = struct.Struct("=HH HH16s HH16s HH HHB3x HH2s2x HH2s2x")
RAW_V4_LEN, RAW_V6_LEN = _RAW_V4.size, _RAW_V6.size  # 48, 72


def raw_tuple(src: bytes, dst: bytes, proto: int, sport_be: bytes, dport_be: bytes) -> bytes:
    """A ported tuple's nested attributes exactly as the kernel dumps them
    (ctnetlink_dump_tuples): IP {src, dst}, PROTO {num, sport, dport}. Matching these raw
    bytes costs the scan one slice per tuple."""
    if len(src) == 4:
        return _RAW_V4.pack(
            20,
            CTA_TUPLE_IP | _NEST,
            8,
            CTA_IP_V4_SRC,
            src,
            8,
            CTA_IP_V4_DST,
            dst,
            28,
            CTA_TUPLE_PROTO | _NEST,
            5,
            CTA_PROTO_NUM,
            proto,
            6,
            CTA_PROTO_SRC_PORT,
            sport_be,
            6,
            CTA_PROTO_DST_PORT,
            dport_be,
        )
    return _RAW_V6.pack(
        44,
        CTA_TUPLE_IP | _NEST,
        20,
        CTA_IP_V6_SRC,
        src,
        20,
        CTA_IP_V6_DST,
        dst,
        28,
        CTA_TUPLE_PROTO | _NEST,
        5,
        CTA_PROTO_NUM,
        proto,
        6,
        CTA_PROTO_SRC_PORT,
        sport_be,
        6,
        CTA_PROTO_DST_PORT,
        dport_be,
    )


def tuple_key(src: bytes, dst: bytes, sport_be: bytes, dport_be: bytes, proto: int) -> bytes:
    """The key the scan reports for this direction of a flow: the raw dump layout for
    ported protocols (a tuple dumped differently is decoded and re-encoded), the decoded
    form (without ports) for the others."""
    if proto in _PORTED:
        return raw_tuple(src, dst, proto, sport_be, dport_be)
    return flow_key(src, dst, sport_be, dport_be, proto)


def _slow_key(data: bytes, s: int, e: int, v6: bool) -> bytes:
    src, dst, proto, sport, dport = _tuple(data, s, e)
    alen = 16 if v6 else 4
    return tuple_key(
        src[:alen], dst[:alen], struct.pack("!H", sport), struct.pack("!H", dport), proto
    )


_HEAD = struct.Struct("=IH10x4xHH")  # nlmsghdr (len, type), nfgenmsg, first attribute


def scan(family: int, wanted: set[bytes]) -> tuple[int, set[bytes]]:
    """Walk this namespace's ``family`` table; return (entries seen, the members of
    ``wanted`` that some entry's original or reply tuple has, see ``tuple_key``). Memory
    stays bounded by ``wanted``, whatever the size of the kernel's table (and by
    RECEIVE_AHEAD buffers: the kernel fills the next buffers on a thread of their own
    while this one is parsed)."""
    found: set[bytes] = set()
    count = 0
    sock = _socket()
    try:
        sock.send(_request(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, family))
        with _Receiver(sock) as buffers:
            for data in buffers:
                seen, done = _scan_buffer(data, family == socket.AF_INET6, wanted, found)
                count += seen
                if done:
                    return count, found
        raise CtnetlinkError(errno.EIO, "conntrack dump ended without NLMSG_DONE")
    except OSError as exc:
        if exc.errno == errno.ENOBUFS:
            raise CtnetlinkError(
                errno.ENOBUFS, "conntrack dump overran the socket buffer; retry"
            ) from exc
        raise
    finally:
        sock.close()


RECEIVE_AHEAD = 8  # 1 MiB buffers received ahead of the parser at most


class _Receiver:
    """The dump's buffers, received on a thread of its own: the recv (where the kernel
    builds the next messages) overlaps the parse of the previous buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=RECEIVE_AHEAD)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ctnetlink-recv", daemon=True)

    def __enter__(self) -> Iterator[bytes]:
        self.sock.settimeout(0.05)  # so that the thread sees ``stop``
        self.thread.start()
        return self._buffers()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a full queue, then wait for the thread
            with contextlib.suppress(queue.Empty):
                self.queue.get_nowait()
            self.thread.join(0.01)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as exc:
                self._put(exc)
                return
            self._put(data)
            if _last_of_dump(data):
                return  # nothing follows: the thread ends without waiting out a timeout

    def _put(self, item: bytes | BaseException) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _buffers(self) -> Iterator[bytes]:
        while True:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item


def _last_of_dump(data: bytes) -> bool:
    """Whether a buffer ends the dump: its last message is NLMSG_DONE (20 bytes) or an
    NLMSG_ERROR (36: the error and the request's header). No conntrack message has
    either type (theirs carry the subsystem in the high byte)."""
    for size, kind in ((20, NLMSG_DONE), (36, NLMSG_ERROR)):
        if len(data) >= size and NLMSG.unpack_from(data, len(data) - size)[:2] == (size, kind):
            return True
    return False


def _scan_buffer(data: bytes, v6: bool, wanted: set[bytes], found: set[bytes]) -> tuple[int, bool]:
    """One receive buffer of the dump: (entries in it, whether the dump ended)."""
    nest_len = (RAW_V6_LEN if v6 else RAW_V4_LEN) + 4
    head, nlattr = _HEAD.unpack_from, NLATTR.unpack_from
    count, off, end = 0, 0, len(data)
    while off + 16 <= end:
        length, mtype = NLMSG.unpack_from(data, off)[:2]
        if mtype == NLMSG_DONE or length < 16:
            return count, True  # DONE is shorter than an entry: checked first
        if mtype == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, off + 16)[0]
            if code:
                raise CtnetlinkError(code, f"conntrack dump: {os.strerror(code)}")
            return count, True
        _, _, a1len, a1type = head(data, off)
        count += 1
        a2 = off + 20 + nest_len
        # the common layout: ORIG then REPLY, both ported tuples of raw_len bytes
        if (
            a1len == nest_len
            and a1type & NLA_TYPE_MASK == CTA_TUPLE_ORIG
            and nlattr(data, a2) == (nest_len, CTA_TUPLE_REPLY | NLA_F_NESTED)
        ):
            orig = data[off + 24 : a2]
            if orig in wanted:
                found.add(orig)
            reply = data[a2 + 4 : a2 + nest_len]
            if reply in wanted:
                found.add(reply)
        else:
            _scan_slow(data, off, length, v6, wanted, found)
        off += (length + 3) & ~3
    return count, False


def _scan_slow(
    data: bytes, off: int, length: int, v6: bool, wanted: set[bytes], found: set[bytes]
) -> None:
    """An entry in another layout (unported protocols, extra attributes first)."""
    for kind, s, e in attrs(data, off + 20, off + length):
        if kind in (CTA_TUPLE_ORIG, CTA_TUPLE_REPLY):
            key = _slow_key(data, s, e, v6)
            if key in wanted:
                found.add(key)
