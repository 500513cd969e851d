"""Typed adapter over pyroute2's asyncio netlink API: the only module importing pyroute2.

pyroute2 is loosely typed (dict-like messages, string commands); this module exposes the
handful of operations the project needs with plain dataclasses, keyword-only hooks and
errors that carry errno and name the interface.

tc hooks are named from the host's side (``HOOK_INGRESS`` is the veth's tc ingress), so the
callers that think in pod directions must map them explicitly (the datapath does).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import itertools
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_IPV6_RULE,
    RTMGRP_LINK,
)

from common.nlmsg import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG,
    NLMSG_DONE,
    NLMSG_ERROR,
    attr_map,
)

Hook = Literal["ingress", "egress"]
HOOK_INGRESS: Hook = "ingress"
HOOK_EGRESS: Hook = "egress"

_PARENT = {HOOK_INGRESS: 0xFFFFFFF2, HOOK_EGRESS: 0xFFFFFFF3}  # TC_H_CLSACT minors
_HOOK_BY_PARENT = {v: k for k, v in _PARENT.items()}
# cls_bpf attributes pyroute2 0.9 does not decode (linux/pkt_cls.h)
_TCA_BPF_TAG = 10
_TCA_BPF_ID = 11
_TCA_BPF_FLAG_ACT_DIRECT = 1

FILTER_PRIO = 1
FILTER_HANDLE = 1


class NetlinkOpError(OSError):
    """A netlink request failed; errno as the kernel gave it, message naming the object."""


@dataclass(frozen=True)
class TcBpfFilter:
    ifindex: int
    hook: Hook
    prio: int
    handle: int
    name: str
    prog_id: int
    tag: str
    direct_action: bool


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    kind: str
    up: bool


@dataclass(frozen=True)
class Addr:
    index: int
    address: str
    prefixlen: int
    scope: int  # 0 universe (global), 253 link, 254 host


@dataclass(frozen=True)
class Route:
    dst: str  # "" for a default route
    dst_len: int
    oif: int
    family: int  # socket.AF_INET / AF_INET6
    table: int


@dataclass(frozen=True)
class Rule:
    """A policy routing rule that looks up a table (``ip rule``); other actions
    (blackhole, prohibit, goto) are not kept."""

    family: int
    table: int
    priority: int


@dataclass(frozen=True)
class NetEvent:
    """A change seen on a netlink subscription."""

    kind: Literal["link", "addr", "route", "rule"]
    added: bool  # False: removed
    link: Link | None = None
    addr: Addr | None = None
    route: Route | None = None
    rule: Rule | None = None


def _raise(exc: NetlinkError, what: str) -> NetlinkOpError:
    code = exc.code or errno.EIO
    return NetlinkOpError(code, f"{what}: {exc}")


def _raw_nla(msg: Any, attr_type: int) -> bytes | None:
    """Payload of an attribute pyroute2 left undecoded ('UNKNOWN'), by its type number,
    read from the wire bytes (struct nlattr: u16 length, u16 type, payload)."""
    for slot in msg["attrs"]:
        name, nla = slot.cell
        if name != "UNKNOWN":
            continue
        length, kind = struct.unpack_from("=HH", nla.data, nla.offset)
        if kind & 0x3FFF == attr_type:
            return bytes(nla.data[nla.offset + 4 : nla.offset + length])
    return None


class Netlink:
    """One rtnetlink socket, optionally inside a named network namespace.

    Use as ``async with Netlink(netns=...) as nl:``.
    """

    def __init__(self, *, netns: str | None = None) -> None:
        self.netns = netns
        self._ipr: Any = None
        # the kernel runs one dump at a time per socket (a second one meanwhile: EBUSY)
        self._dumping = asyncio.Lock()

    async def __aenter__(self) -> Netlink:
        self._ipr = AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    @property
    def _sock(self) -> Any:
        self._require_open()
        return self._ipr

    def _require_open(self) -> None:
        if self._ipr is None:
            raise RuntimeError("Netlink used outside 'async with'")

    # ---- links ----------------------------------------------------------------------
    async def _dump(
        self, request: Callable[..., Awaitable[Any]], *args: Any, **kw: Any
    ) -> list[Any]:
        """The messages of the dump ``request(*args, **kw)`` sends. The kernel runs one
        dump per socket at a time and refuses another meanwhile (EBUSY): dumps on this
        socket take turns."""
        async with self._dumping:
            return [msg async for msg in await request(*args, **kw)]

    async def links(self) -> list[Link]:
        """Every link, read on a socket of its own in a thread of its own (a node's
        hundreds of pod veths: about 10 us each, against 0.4 ms through pyroute2)."""
        self._require_open()  # as every read: only inside 'async with'
        return await _in_own_thread(lambda: _links_of(self.netns))

    async def link_by_name(self, name: str) -> Link | None:
        try:
            msgs = await self._sock.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT, errno.ERANGE, errno.EINVAL):
                return None  # none such (ERANGE, EINVAL: a name no link can have)
            raise _raise(exc, f"link get {name}") from exc
        for msg in msgs:
            return _link(msg)
        return None

    async def addresses(self) -> list[Addr]:
        return [_addr(msg) for msg in await self._dump(self._sock.addr, "dump")]

    async def routes(self) -> list[Route]:
        """Unicast routes of both families, in every table (read as links() reads)."""
        self._require_open()
        return await _in_own_thread(lambda: _routes_of(self.netns))

    async def rules(self) -> list[Rule]:
        """Policy routing rules of both families that look up a table."""
        out: list[Rule] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in await self._dump(self._sock.rule, "dump", family=family):
                r = _rule(msg)
                if r is not None:
                    out.append(r)
        return out

    async def route_get(self, address: str) -> int | None:
        """Interface index the kernel would send ``address`` out of (None: no route)."""
        try:
            msgs = await self._sock.route("get", dst=address)
        except NetlinkError as exc:
            if exc.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOENT):
                return None
            raise _raise(exc, f"route get {address}") from exc
        for msg in msgs:
            oif = msg.get_attr("RTA_OIF")
            if oif:
                return int(oif)
        return None

    async def subscribe(self) -> None:
        """Join the link, address, route and rule multicast groups: changes from now on
        are queued on this socket until read with :meth:`events`."""
        groups = (
            RTMGRP_LINK
            | RTMGRP_IPV4_IFADDR
            | RTMGRP_IPV6_IFADDR
            | RTMGRP_IPV4_ROUTE
            | RTMGRP_IPV6_ROUTE
            | RTMGRP_IPV4_RULE
            | RTMGRP_IPV6_RULE
        )
        await self._sock.bind(groups=groups)

    async def events(self) -> AsyncIterator[NetEvent]:
        """Changes seen since :meth:`subscribe`, forever."""
        while True:
            async for msg in self._sock.get():
                ev = _event(msg)
                if ev is not None:
                    yield ev

    # ---- tc -------------------------------------------------------------------------
    async def ensure_clsact(self, ifindex: int) -> None:
        """Add the clsact qdisc unless the interface already has it."""
        try:
            await self._sock.tc("add", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _raise(exc, f"ifindex {ifindex}: add clsact qdisc") from exc

    async def attach_bpf(self, ifindex: int, *, hook: Hook, prog_fd: int, name: str) -> None:
        """Attach (or atomically replace) our direct-action filter on a clsact hook."""
        await self.ensure_clsact(ifindex)
        try:
            await self._sock.tc(
                "replace-filter",
                "bpf",
                ifindex,
                FILTER_HANDLE,
                fd=prog_fd,
                name=name,
                parent=_PARENT[hook],
                prio=FILTER_PRIO,
                classid=1,
                direct_action=True,
            )
        except NetlinkError as exc:
            raise _raise(exc, f"ifindex {ifindex}: attach {name} on tc {hook}") from exc

    async def detach_bpf(self, ifindex: int, *, hook: Hook) -> bool:
        """Remove our filter from a hook; False if it was not there. Other filters stay."""
        try:
            await self._sock.tc(
                "del-filter",
                "bpf",
                ifindex,
                FILTER_HANDLE,
                parent=_PARENT[hook],
                prio=FILTER_PRIO,
            )
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
                return False
            raise _raise(exc, f"ifindex {ifindex}: detach from tc {hook}") from exc
        return True

    async def bpf_filters(self, ifindex: int, *, hook: Hook | None = None) -> list[TcBpfFilter]:
        """The bpf filters on an interface's clsact hooks (both unless ``hook`` is given)."""
        hooks = [hook] if hook else [HOOK_INGRESS, HOOK_EGRESS]
        out: list[TcBpfFilter] = []
        for h in hooks:
            try:
                msgs = await self._dump(
                    self._sock.tc, "dump-filter", index=ifindex, parent=_PARENT[h]
                )
            except NetlinkError as exc:
                if exc.code in _NO_FILTERS:
                    continue  # no clsact qdisc, or the link is gone
                raise _raise(exc, f"ifindex {ifindex}: list tc filters") from exc
            out += [f for f in (_bpf_filter(m, ifindex) for m in msgs) if f is not None]
        return out

    async def bpf_filters_of(self, ifindexes: Sequence[int]) -> dict[int, list[TcBpfFilter]]:
        """bpf_filters of many interfaces at once: read on a socket of their own, in a
        thread of their own (about 20 us an interface, against milliseconds through
        pyroute2's messages)."""
        if not ifindexes:
            return {}
        return await _in_own_thread(lambda: _filters_of(list(ifindexes), self.netns))


_NO_FILTERS = (errno.EINVAL, errno.ENOENT, errno.ENODEV)  # no clsact qdisc, or no link


# ---- tc filters on a plain socket (Netlink.bpf_filters_of) --------------------------------
_TCMSG = struct.Struct("=BxxxiIII")  # struct tcmsg: family, ifindex, handle, parent, info
_RTM_NEWTFILTER, _RTM_GETTFILTER = 44, 46
_TCA_KIND, _TCA_OPTIONS = 1, 2
_TCA_BPF_NAME, _TCA_BPF_FLAGS = 7, 8
_CLONE_NEWNET = 0x40000000
_T = TypeVar("_T")


async def _in_own_thread(fn: Callable[[], _T]) -> _T:
    """fn() in a thread that ends with it: a thread that entered another network
    namespace never serves anything else."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink-dump")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)
    finally:
        pool.shutdown(wait=False)


def _route_socket(netns: str | None) -> socket.socket:
    """A NETLINK_ROUTE socket in ``netns`` (a name under /run/netns, or a path); the
    calling thread enters it only to create the socket."""
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


def _filters_of(ifindexes: list[int], netns: str | None) -> dict[int, list[TcBpfFilter]]:
    asked = [(ifindex, hook) for ifindex in ifindexes for hook in _PARENT]
    requests = [
        (
            _RTM_GETTFILTER,
            _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, _PARENT[hook], 0),
            f"ifindex {ifindex}: list tc filters",
        )
        for ifindex, hook in asked
    ]
    answers = _dump_of(netns, requests, _RTM_NEWTFILTER, tolerate=_NO_FILTERS)
    out: dict[int, list[TcBpfFilter]] = {ifindex: [] for ifindex in ifindexes}
    for (ifindex, hook), payloads in zip(asked, answers, strict=True):
        for payload in payloads:
            f = _raw_bpf_filter(payload, ifindex, hook)
            if f is not None:
                out[ifindex].append(f)
    return out


# ---- links and routes on a plain socket (Netlink.links, Netlink.routes) -----------------
_IFINFOMSG = struct.Struct("=BxHiII")  # struct ifinfomsg: family, type, index, flags, change
_RTMSG = struct.Struct("=BBBBBBBBI")  # struct rtmsg: family, dst_len, src_len, tos, table,
#                                       protocol, scope, type, flags
_RTM_NEWLINK, _RTM_GETLINK, _RTM_NEWROUTE, _RTM_GETROUTE = 16, 18, 24, 26
_IFLA_IFNAME, _IFLA_LINKINFO, _IFLA_INFO_KIND = 3, 18, 1
_RTA_DST, _RTA_OIF, _RTA_TABLE = 1, 4, 15
_IFF_UP = 1
_U32 = struct.Struct("=I")
_RECV = 1 << 18  # more than the kernel puts in one read of a dump


def _dump_of(
    netns: str | None,
    requests: list[tuple[int, bytes, str]],
    answer: int,
    *,
    tolerate: tuple[int, ...] = (),
) -> list[list[bytes]]:
    """For each dump request (type, body, what it asks: named in errors), the payloads
    of type ``answer`` it returns, read on a socket of its own. A request refused with
    an errno in ``tolerate`` returns what it had (an interface without clsact, or gone);
    another refusal raises."""
    out: list[list[bytes]] = []
    buf = bytearray(_RECV)
    with _route_socket(netns) as sock:
        sock.bind((0, 0))
        for seq, (kind, body, what) in enumerate(requests, 1):
            head = NLMSG.pack(NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
            sock.send(head + body)
            found: list[bytes] = []
            while True:
                size = sock.recv_into(buf, _RECV, socket.MSG_TRUNC)
                if size > _RECV:
                    raise NetlinkOpError(errno.EMSGSIZE, f"{what}: a reply of {size} bytes")
                if _answers(bytes(buf[:size]), seq, answer, what, found, tolerate):
                    break
            out.append(found)
    return out


def _answers(
    data: bytes, seq: int, answer: int, what: str, out: list[bytes], tolerate: tuple[int, ...]
) -> bool:
    """Collect one read's answers into ``out``; whether the dump ended."""
    at = 0
    while at + NLMSG.size <= len(data):
        length, kind, _, msg_seq, _ = NLMSG.unpack_from(data, at)
        if length < NLMSG.size:
            raise NetlinkOpError(errno.EIO, f"{what}: bad netlink message")
        payload = data[at + NLMSG.size : at + length]
        at += (length + 3) & ~3
        if msg_seq != seq:
            continue
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
            if code and code not in tolerate:
                raise NetlinkOpError(code, f"{what}: {os.strerror(code)}")
            return True
        if kind == answer:
            out.append(payload)
    return False


def _text(raw: bytes | None) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw else ""


def _links_of(netns: str | None) -> list[Link]:
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    out = []
    (payloads,) = _dump_of(netns, [(_RTM_GETLINK, body, "list links")], _RTM_NEWLINK)
    for payload in payloads:
        _, _, index, flags, _ = _IFINFOMSG.unpack_from(payload)
        found = attr_map(payload[_IFINFOMSG.size :])
        info = found.get(_IFLA_LINKINFO)
        kind = _text(attr_map(info).get(_IFLA_INFO_KIND)) if info else ""
        out.append(
            Link(
                index=index,
                name=_text(found.get(_IFLA_IFNAME)),
                kind=kind,
                up=bool(flags & _IFF_UP),
            )
        )
    return out


def _routes_of(netns: str | None) -> list[Route]:
    requests = [
        (_RTM_GETROUTE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), "list routes")
        for family in (socket.AF_INET, socket.AF_INET6)
    ]
    out = []
    for payload in itertools.chain(*_dump_of(netns, requests, _RTM_NEWROUTE)):
        family, dst_len, _, _, table, _, _, kind, _ = _RTMSG.unpack_from(payload)
        if kind != _RTN_UNICAST:
            continue
        found = attr_map(payload[_RTMSG.size :])
        dst, oif, full_table = found.get(_RTA_DST), found.get(_RTA_OIF), found.get(_RTA_TABLE)
        out.append(
            Route(
                dst=socket.inet_ntop(family, dst) if dst else "",
                dst_len=dst_len,
                oif=_U32.unpack_from(oif)[0] if oif else 0,
                family=family,
                table=(_U32.unpack_from(full_table)[0] if full_table else 0) or table,
            )
        )
    return out


def _raw_bpf_filter(payload: bytes, ifindex: int, hook: Hook) -> TcBpfFilter | None:
    _, _, handle, _, info = _TCMSG.unpack_from(payload)
    attrs = attr_map(payload[_TCMSG.size :])
    if attrs.get(_TCA_KIND, b"").rstrip(b"\0") != b"bpf" or _TCA_OPTIONS not in attrs:
        return None  # another classifier, or the chain header
    opts = attr_map(attrs[_TCA_OPTIONS])
    raw_id, raw_tag, raw_flags = (
        opts.get(_TCA_BPF_ID),
        opts.get(_TCA_BPF_TAG),
        opts.get(_TCA_BPF_FLAGS),
    )
    return TcBpfFilter(
        ifindex=ifindex,
        hook=hook,
        prio=(info >> 16) & 0xFFFF,
        handle=handle,
        name=opts.get(_TCA_BPF_NAME, b"").split(b"\0", 1)[0].decode(errors="replace"),
        prog_id=struct.unpack("=I", raw_id[:4])[0] if raw_id and len(raw_id) >= 4 else 0,
        tag=raw_tag.hex() if raw_tag else "",
        direct_action=bool(
            raw_flags and struct.unpack("=I", raw_flags[:4])[0] & _TCA_BPF_FLAG_ACT_DIRECT
        ),
    )


def _link(msg: Any) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
    return Link(
        index=msg["index"],
        name=msg.get_attr("IFLA_IFNAME") or "",
        kind=kind or "",
        up=bool(msg["flags"] & 1),
    )


def _addr(msg: Any) -> Addr:
    return Addr(
        index=msg["index"],
        address=msg.get_attr("IFA_ADDRESS") or "",
        prefixlen=msg["prefixlen"],
        scope=msg["scope"],
    )


RT_TABLE_MAIN = 254
_RTN_UNICAST = 1
_FR_ACT_TO_TBL = 1


def _route(msg: Any) -> Route | None:
    table = msg.get_attr("RTA_TABLE") or msg["table"]
    if msg["type"] != _RTN_UNICAST:
        return None
    return Route(
        dst=msg.get_attr("RTA_DST") or "",
        dst_len=msg["dst_len"],
        oif=int(msg.get_attr("RTA_OIF") or 0),
        family=msg["family"],
        table=table,
    )


def _rule(msg: Any) -> Rule | None:
    if msg["action"] != _FR_ACT_TO_TBL:
        return None
    return Rule(
        family=msg["family"],
        table=int(msg.get_attr("FRA_TABLE") or msg["table"]),
        priority=int(msg.get_attr("FRA_PRIORITY") or 0),
    )


def _event(msg: Any) -> NetEvent | None:
    event = msg.get("event", "")
    if event in ("RTM_NEWLINK", "RTM_DELLINK"):
        return NetEvent("link", event == "RTM_NEWLINK", link=_link(msg))
    if event in ("RTM_NEWADDR", "RTM_DELADDR"):
        return NetEvent("addr", event == "RTM_NEWADDR", addr=_addr(msg))
    if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
        r = _route(msg)
        return NetEvent("route", event == "RTM_NEWROUTE", route=r) if r else None
    if event in ("RTM_NEWRULE", "RTM_DELRULE"):
        rule = _rule(msg)
        return NetEvent("rule", event == "RTM_NEWRULE", rule=rule) if rule else None
    return None


def _bpf_filter(msg: Any, ifindex: int) -> TcBpfFilter | None:
    if msg.get_attr("TCA_KIND") != "bpf":
        return None
    opts = msg.get_attr("TCA_OPTIONS")
    if opts is None:
        return None  # the chain header, not a filter
    raw_id = _raw_nla(opts, _TCA_BPF_ID)
    raw_tag = _raw_nla(opts, _TCA_BPF_TAG)
    return TcBpfFilter(
        ifindex=ifindex,
        hook=_HOOK_BY_PARENT.get(msg["parent"], HOOK_INGRESS),
        prio=(msg["info"] >> 16) & 0xFFFF,
        handle=msg["handle"],
        name=opts.get_attr("TCA_BPF_NAME") or "",
        prog_id=struct.unpack("=I", raw_id)[0] if raw_id and len(raw_id) >= 4 else 0,
        tag=raw_tag.hex() if raw_tag else "",
        direct_action=bool((opts.get_attr("TCA_BPF_FLAGS") or 0) & _TCA_BPF_FLAG_ACT_DIRECT),
    )
