"""Reading tc attachments through the kernel's netlink: pyroute2's messages and the
plain-socket batch the enforcer adopts with (common.netlink)."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest

from bpf import layout as lay
from bpf.attach import attach, attachment, attachments
from bpf.datapath import Datapath
from common.netlink import HOOK_EGRESS, HOOK_INGRESS, Netlink, Route, _link, _route
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


async def test_links_and_routes_read_by_hand_are_what_pyroute2_decodes(sim: SimNode) -> None:
    """Links (veths up and down, loopback) and unicast routes of both families
    in several tables (with and without an interface, a default, a blackhole that is not
    kept): the hand-read dumps give exactly what pyroute2's decoded messages give. So
    many veths that a dump takes several reads."""
    _ip(
        sim.netns,
        [
            *(f"link add nlr{i} type veth peer name nls{i}" for i in range(VETHS * 4)),
            *(f"link set nlr{i} up" for i in range(0, VETHS * 4, 2)),
            "link add nld0 type veth peer name nle0",
            "link set nld0 up",
            "addr add 192.0.2.1/24 dev nld0",
            "addr add 2001:db8::1/64 dev nld0",
            *(
                f"route add 10.77.{i}.1/32 dev nlr{i} table {100 + i % 3}"
                for i in range(0, VETHS, 2)
            ),
            *(f"route add fd77::{i:x}/128 dev nlr{i}" for i in range(0, VETHS, 2)),
            "route add default via 192.0.2.254 dev nld0 table 300000",
            "route add blackhole 10.78.0.0/16",
        ],
    )
    async with Netlink(netns=sim.netns) as nl:
        decoded_links = [_link(m) for m in await nl._dump(nl._sock.link, "dump")]
        decoded_routes = [
            r
            for family in (socket.AF_INET, socket.AF_INET6)
            for r in map(_route, await nl._dump(nl._sock.route, "dump", family=family))
            if r is not None
        ]
        links, routes = await nl.links(), await nl.routes()
    assert links == decoded_links
    assert routes == decoded_routes
    by_name = {link.name: link for link in links}
    assert (by_name["nlr0"].kind, by_name["nlr0"].up, by_name["nlr1"].up) == ("veth", True, False)
    assert by_name["lo"].kind == ""
    assert Route("10.77.2.1", 32, by_name["nlr2"].index, socket.AF_INET, 102) in routes
    assert Route("fd77::4", 128, by_name["nlr4"].index, socket.AF_INET6, 254) in routes
    assert Route("", 0, by_name["nld0"].index, socket.AF_INET, 300000) in routes
    assert not [r for r in routes if r.dst == "10.78.0.0"]


async def test_reading_links_outside_its_block_is_refused(sim: SimNode) -> None:
    nl = Netlink(netns=sim.netns)
    with pytest.raises(RuntimeError, match="outside 'async with'"):
        await nl.links()
