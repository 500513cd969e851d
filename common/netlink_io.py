"""rtnetlink on plain sockets: the bytes of requests and answers, nothing decoded.

Every call opens a socket of its own (inside a network namespace when asked: the calling
thread enters it only to create the socket) and runs in a thread of its own, so the
event loop never blocks on the kernel. Three shapes of exchange:

- ``dumps``: dump requests, the payloads of each;
- ``requests``: requests acknowledged one by one (writes), sent many to a ``send`` and
  answered with an errno each;
- ``ask``: one request answered by one message (``get``).

``Subscription`` is a socket joined to multicast groups, read by the event loop.

Errors carry the kernel's errno and, when the kernel gives one, its extended message
(``NETLINK_EXT_ACK``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from common.nlmsg import NLM_F_DUMP, NLM_F_REQUEST, NLMSG, NLMSG_DONE, NLMSG_ERROR, attr_map

NLM_F_ACK = 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
_NLM_F_ACK_TLVS = 0x200  # on an error: extended-ack attributes follow the echoed header
_SOL_NETLINK = 270
_NETLINK_EXT_ACK, _NETLINK_CAP_ACK = 11, 10
_NLMSGERR_ATTR_MSG = 1
_SO_RCVBUFFORCE = 33
_CLONE_NEWNET = 0x40000000
_RECV = 1 << 18  # more than the kernel puts in one read of a dump
_BATCH = 64  # acknowledged requests in one send: their acks fit the default buffer
TIMEOUT = 10.0  # seconds a request's answer (or a dump's next read) may take
_T = TypeVar("_T")


class NetlinkOpError(OSError):
    """A netlink request failed; errno as the kernel gave it, message naming the object."""


@dataclass(frozen=True)
class Request:
    """One request: message type, flags besides NLM_F_REQUEST, body (the fixed header and
    attributes), and what it does, for errors."""

    kind: int
    flags: int
    body: bytes
    what: str


async def in_own_thread(fn: Callable[[], _T]) -> _T:
    """fn() in a thread that ends with it: a thread that entered another network
    namespace never serves anything else."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)
    finally:
        pool.shutdown(wait=False)


def route_socket(netns: str | None) -> socket.socket:
    """A NETLINK_ROUTE socket in ``netns`` (a name under /run/netns, or a path), bound,
    with extended and capped acknowledgements, and reads that give up after TIMEOUT (a
    call never holds its thread, or its caller, for ever)."""
    sock = _in_netns(netns)
    try:
        sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
        sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        sock.settimeout(TIMEOUT)
        sock.bind((0, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _in_netns(netns: str | None) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    libc = ctypes.CDLL(None, use_errno=True)
    path = netns if "/" in netns else f"/run/netns/{netns}"
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetlinkOpError(err, f"enter network namespace {netns}: {os.strerror(err)}")
            try:
                return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            finally:
                if libc.setns(own, _CLONE_NEWNET) != 0:  # the thread ends anyway
                    err = ctypes.get_errno()
                    raise NetlinkOpError(err, f"leave network namespace {netns}")
        finally:
            os.close(target)
    finally:
        os.close(own)


def _message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return NLMSG.pack(NLMSG.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def _error_of(payload: bytes, flags: int) -> tuple[int, str]:
    """(errno, the kernel's extended message or "") of an NLMSG_ERROR payload; errno 0
    is an acknowledgement. With NETLINK_CAP_ACK the request is echoed by its header only."""
    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else errno.EIO
    text = ""
    if code and flags & _NLM_F_ACK_TLVS and len(payload) >= 4 + NLMSG.size:
        raw = attr_map(payload[4 + NLMSG.size :]).get(_NLMSGERR_ATTR_MSG)
        text = raw.split(b"\0", 1)[0].decode(errors="replace") if raw else ""
    return code, text


def failure(code: int, what: str, text: str = "") -> NetlinkOpError:
    detail = f"{os.strerror(code)} ({text})" if text else os.strerror(code)
    return NetlinkOpError(code, f"{what}: {detail}")


def _send(sock: socket.socket, data: bytes, what: str) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        raise failure(exc.errno or errno.EIO, what) from exc


def _read(sock: socket.socket, buf: bytearray, what: str) -> memoryview:
    try:
        size = sock.recv_into(buf, _RECV, socket.MSG_TRUNC)
    except TimeoutError as exc:
        raise failure(errno.ETIMEDOUT, what, f"no answer in {TIMEOUT:g} s") from exc
    except OSError as exc:  # ENOBUFS: answers the socket had no room for were lost
        raise failure(exc.errno or errno.EIO, what) from exc
    if size > _RECV:
        raise NetlinkOpError(errno.EMSGSIZE, f"{what}: a reply of {size} bytes")
    return memoryview(buf)[:size]


def _messages(data: memoryview, what: str) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) of each message in one read."""
    out = []
    at = 0
    while at + NLMSG.size <= len(data):
        length, kind, flags, seq, _ = NLMSG.unpack_from(data, at)
        if length < NLMSG.size or at + length > len(data):
            raise NetlinkOpError(errno.EIO, f"{what}: bad netlink message")
        out.append((kind, flags, seq, bytes(data[at + NLMSG.size : at + length])))
        at += (length + 3) & ~3
    return out


def dumps(
    netns: str | None,
    requests: Sequence[tuple[int, bytes, str]],
    answer: int,
    *,
    tolerate: tuple[int, ...] = (),
) -> list[list[bytes]]:
    """For each dump request (type, body, what it asks: named in errors), the payloads
    of type ``answer`` it returns. A request refused with an errno in ``tolerate``
    returns what it had (an interface without clsact, or gone); another refusal raises.
    Blocking: call through :func:`in_own_thread`."""
    out: list[list[bytes]] = []
    buf = bytearray(_RECV)
    with route_socket(netns) as sock:
        for seq, (kind, body, what) in enumerate(requests, 1):
            _send(sock, _message(kind, NLM_F_DUMP, seq, body), what)
            found: list[bytes] = []
            done = False
            while not done:
                for msg_kind, flags, msg_seq, payload in _messages(_read(sock, buf, what), what):
                    if msg_seq != seq:
                        continue
                    if msg_kind in (NLMSG_DONE, NLMSG_ERROR):
                        code, text = _error_of(payload, flags)
                        if code and code not in tolerate:
                            raise failure(code, what, text)
                        done = True
                        break
                    if msg_kind == answer:
                        found.append(payload)
            out.append(found)
    return out


def requests(netns: str | None, asked: Sequence[Request]) -> list[NetlinkOpError | None]:
    """Send each request with an acknowledgement asked, up to ``_BATCH`` in one send (the
    kernel runs a send's messages in order, and one's failure does not stop the next);
    each one's refusal, or None. Blocking: call through :func:`in_own_thread`."""
    out: list[NetlinkOpError | None] = [None] * len(asked)
    buf = bytearray(_RECV)
    with route_socket(netns) as sock:
        for start in range(0, len(asked), _BATCH):
            chunk = range(start, min(start + _BATCH, len(asked)))
            batch = b"".join(
                _message(asked[i].kind, asked[i].flags | NLM_F_ACK, i + 1, asked[i].body)
                for i in chunk
            )
            _send(sock, batch, asked[chunk[0]].what)
            waiting = set(chunk)
            while waiting:
                for kind, flags, seq, payload in _messages(_read(sock, buf, "acks"), "acks"):
                    i = seq - 1
                    if kind != NLMSG_ERROR or i not in waiting:
                        continue
                    waiting.discard(i)
                    code, text = _error_of(payload, flags)
                    if code:
                        out[i] = failure(code, asked[i].what, text)
    return out


def ask(netns: str | None, request: Request, answer: int) -> bytes:
    """The one message of type ``answer`` a request is answered with; a refusal raises.
    Blocking: call through :func:`in_own_thread`."""
    buf = bytearray(_RECV)
    with route_socket(netns) as sock:
        _send(sock, _message(request.kind, request.flags, 1, request.body), request.what)
        what = request.what
        while True:
            for kind, flags, seq, payload in _messages(_read(sock, buf, what), what):
                if seq != 1:
                    continue
                if kind == answer:
                    return payload
                if kind == NLMSG_ERROR:
                    code, text = _error_of(payload, flags)
                    raise failure(code or errno.EIO, request.what, text)


class Subscription:
    """A socket joined to rtnetlink multicast groups: the changes announced from its
    creation on, read without blocking the event loop."""

    RCVBUF = 8 << 20  # a burst of pod churn while the loop is busy must not overrun it

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray(_RECV)

    @classmethod
    def open(cls, netns: str | None, groups: int) -> Subscription:
        """Blocking (it may enter ``netns``): call through :func:`in_own_thread`."""
        sock = _in_netns(netns)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, cls.RCVBUF)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cls.RCVBUF)
            sock.bind((0, groups))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def read(self) -> list[tuple[int, bytes]]:
        """(type, payload) of the messages of the next datagram. An overrun (the kernel
        dropped announcements: ENOBUFS) raises: what was missed cannot be known."""
        try:
            size = await asyncio.get_running_loop().sock_recv_into(self._sock, self._buf)
        except OSError as exc:
            raise failure(exc.errno or errno.EIO, "read netlink announcements") from exc
        view = memoryview(self._buf)[:size]
        return [(k, p) for k, _, _, p in _messages(view, "announcements")]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
