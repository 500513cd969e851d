"""Netlink messages read by hand (light to import): the header and attribute layouts
and the walk over a message's attributes. Used by the conntrack cleaner's ctnetlink scan
and by common.netlink (rtnetlink), where a general decoder's messages are too slow.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr: length, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # struct nlattr: length, type
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF


def attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of the attributes in buf[start:end]."""
    off = start
    while off + NLATTR.size <= end:
        length, kind = NLATTR.unpack_from(buf, off)
        if length < NLATTR.size:
            return
        yield kind & NLA_TYPE_MASK, off + NLATTR.size, off + length
        off += (length + 3) & ~3


def attr_map(buf: bytes) -> dict[int, bytes]:
    """The attributes of ``buf`` by type (the last of a repeated type)."""
    return {kind: buf[s:e] for kind, s, e in attrs(buf, 0, len(buf))}
