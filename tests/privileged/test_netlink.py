"""Reading tc attachments through the kernel's netlink: pyroute2's messages and the
plain-socket batch the enforcer adopts with (common.netlink)."""

from __future__ import annotations

import asyncio
import subprocess

from bpf import layout as lay
from bpf.attach import attach, attachment, attachments
from bpf.datapath import Datapath
from common.netlink import HOOK_EGRESS, HOOK_INGRESS, Netlink
from simnode.node import SimNode

VETHS = 40


def _ip(netns: str, commands: list[str]) -> None:
    subprocess.run(
        ["ip", "-n", netns, "-batch", "-"], input="\n".join(commands), text=True, check=True
    )


async def test_one_read_of_many_interfaces_sees_what_each_read_sees(
    sim: SimNode, datapath: Datapath
) -> None:
    """Veths with both programs, with one, with a filter of another name, with no clsact
    qdisc, and an interface index that does not exist: the batch answers each as the
    per-interface read does, on a socket in the node's namespace."""
    _ip(sim.netns, [f"link add nlt{i} type veth peer name nlp{i}" for i in range(VETHS)])
    async with Netlink(netns=sim.netns) as nl:
        index = {link.name: link.index for link in await nl.links()}
        veths = [index[f"nlt{i}"] for i in range(VETHS)]
        for i in veths[:-3]:
            await attach(nl, i, ingress=datapath.ingress_prog, egress=datapath.egress_prog)
        await nl.attach_bpf(
            veths[-3], hook=HOOK_INGRESS, prog_fd=datapath.egress_prog.fd, name=lay.PROG_EGRESS
        )
        await nl.attach_bpf(
            veths[-2], hook=HOOK_EGRESS, prog_fd=datapath.ingress_prog.fd, name="someone-else"
        )
        gone = max(index.values()) + 1000
        asked = [*veths, gone]

        batch = await nl.bpf_filters_of(asked)
        one_by_one = {i: await nl.bpf_filters(i) for i in asked}
        assert batch == one_by_one
        assert batch[veths[-1]] == batch[gone] == []
        (foreign,) = batch[veths[-2]]
        assert (foreign.name, foreign.hook, foreign.direct_action) == (
            "someone-else",
            HOOK_EGRESS,
            True,
        )
        assert foreign.tag  # read from the kernel's attributes, like the id

        mine = (datapath.ingress_prog.id, datapath.egress_prog.id)
        atts = await attachments(nl, asked)
        assert {i for i, a in atts.items() if (a.ingress_prog_id, a.egress_prog_id) == mine} == set(
            veths[:-3]
        )
        assert atts[veths[-3]].egress_prog_id == datapath.egress_prog.id
        assert atts[veths[-3]].ingress_prog_id == 0
        assert (atts[veths[-2]].ingress_prog_id, atts[veths[-2]].egress_prog_id) == (0, 0)


async def test_concurrent_reads_on_one_socket_all_answer(sim: SimNode, datapath: Datapath) -> None:
    """The kernel runs one dump per socket at a time and refuses another meanwhile
    (EBUSY): reads started together on one Netlink (filters, links, addresses, routes,
    rules) take turns and all answer."""
    _ip(sim.netns, [f"link add nlc{i} type veth peer name nlq{i}" for i in range(VETHS)])
    async with Netlink(netns=sim.netns) as nl:
        index = {link.name: link.index for link in await nl.links()}
        veths = [index[f"nlc{i}"] for i in range(VETHS)]
        for i in veths:
            await attach(nl, i, ingress=datapath.ingress_prog, egress=datapath.egress_prog)
        got, links, addresses, routes, _ = await asyncio.gather(
            asyncio.gather(*(attachment(nl, i) for i in veths * 3)),
            nl.links(),
            nl.addresses(),
            nl.routes(),
            nl.rules(),
        )
    assert {(a.ingress_prog_id, a.egress_prog_id) for a in got} == {
        (datapath.ingress_prog.id, datapath.egress_prog.id)
    }
    assert {link.index for link in links} >= set(veths)
    assert any(a.address == str(sim.node_ipv4) for a in addresses)
    assert routes
