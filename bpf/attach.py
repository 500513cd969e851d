"""Attach the datapath's programs to a pod's host-side veth (tc clsact).

Directions swap at the veth: traffic *to* the pod leaves the host through the veth (tc
egress hook), traffic *from* the pod enters the host through it (tc ingress hook). So the
pod's ingress program sits on the veth's tc egress and its egress program on tc ingress.
Attaching replaces our filter atomically (same priority and handle), so re-pointing a veth
at a newly loaded program never leaves it unfiltered.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bpf import layout
from bpf.objects import Program
from common.netlink import (
    HOOK_EGRESS,
    HOOK_INGRESS,
    Netlink,
    NetlinkOpError,
    TcBpfFilter,
    TcProgram,
)


class HasPrograms(Protocol):
    ingress_prog: Program
    egress_prog: Program


POD_INGRESS_HOOK = HOOK_EGRESS
POD_EGRESS_HOOK = HOOK_INGRESS


@dataclass(frozen=True)
class Attachment:
    """Program ids on a veth (0: nothing of ours attached)."""

    ingress_prog_id: int
    egress_prog_id: int


async def attach(nl: Netlink, ifindex: int, *, ingress: Program, egress: Program) -> None:
    failed = await attach_many(nl, [ifindex], ingress=ingress, egress=egress)
    if ifindex in failed:
        raise failed[ifindex]


async def attach_many(
    nl: Netlink, ifindexes: Sequence[int], *, ingress: Program, egress: Program
) -> dict[int, NetlinkOpError]:
    """attach() on many interfaces, asked of the kernel at once; the interfaces that
    failed, each with its first refusal."""
    return await nl.attach_many(
        ifindexes,
        [
            TcProgram(POD_INGRESS_HOOK, ingress.fd, layout.PROG_INGRESS),
            TcProgram(POD_EGRESS_HOOK, egress.fd, layout.PROG_EGRESS),
        ],
    )


async def detach(nl: Netlink, ifindex: int) -> None:
    await nl.detach_bpf(ifindex, hook=POD_INGRESS_HOOK)
    await nl.detach_bpf(ifindex, hook=POD_EGRESS_HOOK)


async def attachment(nl: Netlink, ifindex: int) -> Attachment:
    return _attachment(await nl.bpf_filters(ifindex))


async def attachments(nl: Netlink, ifindexes: Sequence[int]) -> dict[int, Attachment]:
    """attachment() of many interfaces, read at once (Netlink.bpf_filters_of)."""
    return {i: _attachment(fs) for i, fs in (await nl.bpf_filters_of(ifindexes)).items()}


def _attachment(filters: Iterable[TcBpfFilter]) -> Attachment:
    ids = {HOOK_INGRESS: 0, HOOK_EGRESS: 0}
    for f in filters:
        if f.name in (layout.PROG_INGRESS, layout.PROG_EGRESS):
            ids[f.hook] = f.prog_id
    return Attachment(ingress_prog_id=ids[POD_INGRESS_HOOK], egress_prog_id=ids[POD_EGRESS_HOOK])


def ours(dp: HasPrograms) -> tuple[int, int]:
    """(ingress, egress) program ids of the loaded datapath: an interface whose
    attachment equals this runs our current programs."""
    return dp.ingress_prog.id, dp.egress_prog.id
