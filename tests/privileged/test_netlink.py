"""The node's rtnetlink through common.netlink's hand-built requests: links, addresses,
routes, rules, their changes and the tc filters, checked against what pyroute2 (a
general netlink library, not ours) reads and writes on the same kernel."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import subprocess
from dataclasses import replace
from typing import Any

import pytest

from bpf import layout as lay
from bpf.attach import attach, attach_many, attachment, attachments
from bpf.datapath import Datapath
from common.netlink import (
    FILTER_PRIO,
    HOOK_EGRESS,
    HOOK_INGRESS,
    Addr,
    Link,
    NetEvent,
    Netlink,
    NetlinkOpError,
    Route,
    Rule,
)
from common.netlink_io import Subscription
from simnode.node import SimNode

VETHS = 40


def _ip(netns: str, commands: list[str], *options: str) -> None:
    subprocess.run(
        ["ip", "-n", netns, *options, "-batch", "-"],
        input="\n".join(commands),
        text=True,
        check=True,
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


async def test_concurrent_reads_on_one_netlink_all_answer(sim: SimNode, datapath: Datapath) -> None:
    """The kernel runs one dump per socket at a time and refuses another meanwhile
    (EBUSY): reads started together on one Netlink (filters, links, addresses, routes,
    rules) each have a socket of their own, and all answer."""
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


# ---- pyroute2 as the reference decoder: what a general netlink library makes of the
# same kernel answers (a test dependency only; the agent no longer imports it)
def _pr_link(msg: Any) -> Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else ""
    return Link(msg["index"], msg.get_attr("IFLA_IFNAME") or "", kind or "", bool(msg["flags"] & 1))


def _pr_addr(msg: Any) -> Addr:
    return Addr(msg["index"], msg.get_attr("IFA_ADDRESS") or "", msg["prefixlen"], msg["scope"])


def _pr_route(msg: Any) -> Route | None:
    if msg["type"] != 1:  # unicast
        return None
    return Route(
        msg.get_attr("RTA_DST") or "",
        msg["dst_len"],
        int(msg.get_attr("RTA_OIF") or 0),
        msg["family"],
        msg.get_attr("RTA_TABLE") or msg["table"],
    )


def _pr_rule(msg: Any) -> Rule | None:
    if msg["action"] != 1:  # FR_ACT_TO_TBL
        return None
    return Rule(
        msg["family"],
        int(msg.get_attr("FRA_TABLE") or msg["table"]),
        int(msg.get_attr("FRA_PRIORITY") or 0),
    )


def _pr_event(msg: Any) -> NetEvent | None:
    event = msg.get("event", "")
    kind, _, added = {
        "RTM_NEWLINK": ("link", 0, True),
        "RTM_DELLINK": ("link", 0, False),
        "RTM_NEWADDR": ("addr", 0, True),
        "RTM_DELADDR": ("addr", 0, False),
        "RTM_NEWROUTE": ("route", 0, True),
        "RTM_DELROUTE": ("route", 0, False),
        "RTM_NEWRULE": ("rule", 0, True),
        "RTM_DELRULE": ("rule", 0, False),
    }.get(event, ("", 0, False))
    if kind == "link":
        return NetEvent("link", added, link=_pr_link(msg))
    if kind == "addr":
        return NetEvent("addr", added, addr=_pr_addr(msg))
    if kind == "route":
        r = _pr_route(msg)
        return NetEvent("route", added, route=r) if r else None
    if kind == "rule":
        rule = _pr_rule(msg)
        return NetEvent("rule", added, rule=rule) if rule else None
    return None


def _state_commands() -> list[str]:
    return [
        *(f"link add nlr{i} type veth peer name nls{i}" for i in range(VETHS * 4)),
        *(f"link set nlr{i} up" for i in range(0, VETHS * 4, 2)),
        "link add nld0 type veth peer name nle0",
        "link set nld0 up",
        "addr add 192.0.2.1/24 dev nld0",
        "addr add 2001:db8::1/64 dev nld0",
        "addr add 198.51.100.7/32 dev nlr2",
        *(f"route add 10.77.{i}.1/32 dev nlr{i} table {100 + i % 3}" for i in range(0, VETHS, 2)),
        *(f"route add fd77::{i:x}/128 dev nlr{i}" for i in range(0, VETHS, 2)),
        "route add default via 192.0.2.254 dev nld0 table 300000",
        "route add blackhole 10.78.0.0/16",
        "rule add from 10.77.0.0/16 lookup 100 priority 1000",
        "rule add to 10.79.0.0/16 lookup 300000",
        "rule add from 10.80.0.0/16 blackhole priority 1001",
    ]


async def test_state_read_by_hand_is_what_pyroute2_decodes(sim: SimNode) -> None:
    """Links (veths up and down, loopback), addresses of both families, unicast routes
    of both families in several tables (with and without an interface, a default, a
    blackhole that is not kept), rules (a blackhole rule not kept), one route asked
    for and a link asked by name: what our hand-built requests read is exactly what
    pyroute2 decodes from the same kernel. So many veths that a dump takes several
    reads."""
    from pyroute2 import IPRoute

    _ip(sim.netns, _state_commands())
    _ip(sim.netns, ["rule add from fd77::/64 lookup 101 priority 1002"], "-6")

    def reference() -> tuple[list[Link], list[Addr], list[Route], list[Rule], int]:
        with IPRoute(netns=sim.netns) as ipr:
            families = (socket.AF_INET, socket.AF_INET6)
            return (
                [_pr_link(m) for m in ipr.link("dump")],
                [_pr_addr(m) for m in ipr.addr("dump")],
                [
                    r
                    for family in families
                    for r in map(_pr_route, ipr.route("dump", family=family))
                    if r is not None
                ],
                [
                    r
                    for family in families
                    for r in map(_pr_rule, ipr.rule("dump", family=family))
                    if r is not None
                ],
                ipr.route("get", dst="192.0.2.9")[0].get_attr("RTA_OIF"),
            )

    # pyroute2's synchronous API runs an event loop of its own: in a thread
    want_links, want_addrs, want_routes, want_rules, want_oif = await asyncio.to_thread(reference)
    async with Netlink(netns=sim.netns) as nl:
        links, addrs, routes, rules = await asyncio.gather(
            nl.links(), nl.addresses(), nl.routes(), nl.rules()
        )
        by_name = {link.name: link for link in links}
        assert await nl.link_by_name("nlr3") == by_name["nlr3"]
        assert await nl.link_by_name("nosuchlink") is None
        assert await nl.link_by_name("x" * 40) is None  # longer than any name
        assert await nl.route_get("192.0.2.9") == want_oif == by_name["nld0"].index
        assert await nl.route_get("fd77::4") == by_name["nlr4"].index
        assert await nl.route_get("203.0.113.9") is None  # no default in the main table
    assert (links, addrs, routes, rules) == (want_links, want_addrs, want_routes, want_rules)
    assert (by_name["nlr0"].kind, by_name["nlr0"].up, by_name["nlr1"].up) == ("veth", True, False)
    assert by_name["lo"].kind == ""
    assert Addr(by_name["nlr2"].index, "198.51.100.7", 32, 0) in addrs
    assert Addr(by_name["nld0"].index, "2001:db8::1", 64, 0) in addrs
    assert Route("10.77.2.1", 32, by_name["nlr2"].index, socket.AF_INET, 102) in routes
    assert Route("fd77::4", 128, by_name["nlr4"].index, socket.AF_INET6, 254) in routes
    assert Route("", 0, by_name["nld0"].index, socket.AF_INET, 300000) in routes
    assert not [r for r in routes if r.dst == "10.78.0.0"]
    assert Rule(socket.AF_INET, 100, 1000) in rules
    assert Rule(socket.AF_INET6, 101, 1002) in rules
    assert [r for r in rules if r.table == 300000]
    assert not [r for r in rules if r.priority == 1001]  # the blackhole


async def test_events_are_what_pyroute2_decodes(sim: SimNode) -> None:
    """Changes of every kind the agent follows (links added, set up, removed; addresses,
    routes and rules added and removed), read by our subscription and by pyroute2's
    on the same namespace: the same events, in the same order."""
    from pyroute2 import AsyncIPRoute

    groups = 0x1 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x10000000
    ours: list[NetEvent] = []
    theirs: list[NetEvent] = []

    def done(events: list[NetEvent]) -> bool:
        return any(e.link is not None and e.link.name == "nlend" for e in events)

    async def read_ours(nl: Netlink) -> None:
        async for ev in nl.events():
            ours.append(ev)
            if done(ours):
                return

    async def read_theirs(ipr: Any) -> None:
        while not done(theirs):
            async for msg in ipr.get():
                ev = _pr_event(msg)
                if ev is not None:
                    theirs.append(ev)

    async with Netlink(netns=sim.netns) as nl, AsyncIPRoute(netns=sim.netns) as ipr:
        await nl.subscribe()
        await ipr.bind(groups=groups)
        _ip(
            sim.netns,
            [
                *(f"link add nlv{i} type veth peer name nlw{i}" for i in range(8)),
                "link set nlv0 up",
                "addr add 192.0.2.5/24 dev nlv0",
                "addr add 2001:db8:5::1/64 dev nlv0 nodad",
                "route add 10.81.0.1/32 dev nlv0 table 107",
                "route add fd81::1/128 dev nlv0",
                "rule add from 10.81.0.0/16 lookup 107 priority 1100",
                "rule del from 10.81.0.0/16 lookup 107 priority 1100",
                "route del 10.81.0.1/32 dev nlv0 table 107",
                "addr del 192.0.2.5/24 dev nlv0",
                *(f"link del nlv{i}" for i in range(1, 8)),
                "link add nlend type veth peer name nlendp",
            ],
        )
        await asyncio.wait_for(asyncio.gather(read_ours(nl), read_theirs(ipr)), 10)
    assert ours == theirs
    kinds = {(e.kind, e.added) for e in ours}
    assert kinds >= {(k, a) for k in ("link", "addr", "route", "rule") for a in (True, False)}


async def test_attach_many_is_what_one_by_one_attaches_and_names_failures(
    sim: SimNode, datapath: Datapath
) -> None:
    """Many veths at once: new ones (no clsact), one with clsact and a filter of someone
    else's on another priority (kept), one with ours of an older attach (replaced),
    and an interface that does not exist (its failure named, the others done). Every
    veth ends with the filters pyroute2 attaches on a twin, byte for byte as the kernel
    reports them (but the interface)."""
    from pyroute2 import IPRoute

    n = VETHS * 2
    _ip(
        sim.netns,
        [
            *(f"link add nla{i} type veth peer name nlb{i}" for i in range(n)),
            "link add nltwin type veth peer name nltwinp",
        ],
    )
    ing, egr = datapath.ingress_prog, datapath.egress_prog
    async with Netlink(netns=sim.netns) as nl:
        index = {link.name: link.index for link in await nl.links()}
        veths = [index[f"nla{i}"] for i in range(n)]
        twin = index["nltwin"]

        def by_pyroute2() -> None:
            with IPRoute(netns=sim.netns) as ipr:
                ipr.tc("add", "clsact", veths[1])
                ipr.tc(
                    "add-filter",
                    "bpf",
                    veths[1],
                    7,
                    fd=egr.fd,
                    name="someone-else",
                    parent=0xFFFFFFF2,
                    prio=5,
                    classid=1,
                    direct_action=True,
                )
                ipr.tc("add", "clsact", twin)
                for parent, prog, name in (
                    (0xFFFFFFF3, ing, lay.PROG_INGRESS),
                    (0xFFFFFFF2, egr, lay.PROG_EGRESS),
                ):
                    ipr.tc(
                        "replace-filter",
                        "bpf",
                        twin,
                        1,
                        fd=prog.fd,
                        name=name,
                        parent=parent,
                        prio=1,
                        classid=1,
                        direct_action=True,
                    )

        await asyncio.to_thread(by_pyroute2)
        await nl.attach_bpf(veths[2], hook=HOOK_EGRESS, prog_fd=egr.fd, name="older")
        gone = max(index.values()) + 1000

        failed = await attach_many(nl, [*veths, gone], ingress=ing, egress=egr)
        assert list(failed) == [gone]
        assert failed[gone].errno in (errno.ENODEV, errno.EINVAL)
        assert f"ifindex {gone}" in str(failed[gone])

        filters = await nl.bpf_filters_of([*veths, twin])
        reference = {replace(f, ifindex=0) for f in filters[twin]}
        assert len(reference) == 2
        for i in veths:
            mine = {replace(f, ifindex=0) for f in filters[i] if f.prio == FILTER_PRIO}
            assert mine == reference, i
        (foreign,) = [f for f in filters[veths[1]] if f.prio == 5]
        assert foreign.name == "someone-else"
        atts = await attachments(nl, veths)
        assert {(a.ingress_prog_id, a.egress_prog_id) for a in atts.values()} == {(ing.id, egr.id)}

        # one at a time, and taken off again: the other filter stays
        assert await nl.detach_bpf(veths[1], hook=HOOK_INGRESS)
        assert not await nl.detach_bpf(veths[1], hook=HOOK_INGRESS)
        assert not await nl.detach_bpf(gone, hook=HOOK_INGRESS)
        left = await nl.bpf_filters(veths[1])
        assert {(f.hook, f.prio) for f in left} == {(HOOK_EGRESS, FILTER_PRIO), (HOOK_INGRESS, 5)}
        await nl.ensure_clsact(veths[1])  # present: nothing to do
        with pytest.raises(NetlinkOpError, match=f"ifindex {gone}: add clsact qdisc"):
            await nl.ensure_clsact(gone)


async def test_reading_links_outside_its_block_is_refused(sim: SimNode) -> None:
    nl = Netlink(netns=sim.netns)
    with pytest.raises(RuntimeError, match="outside 'async with'"):
        await nl.links()


async def test_lost_changes_are_read_again(sim: SimNode, monkeypatch: pytest.MonkeyPatch) -> None:
    """A subscription whose queue overruns (the kernel drops announcements: ENOBUFS)
    while the loop is busy: hostnet reads the state again and announces the difference,
    so links created and removed meanwhile are known, and the removed one is announced
    as removed."""
    from structlog.testing import capture_logs

    from agent.hostnet import HostNet

    monkeypatch.setattr(Subscription, "RCVBUF", 4096)  # the kernel's smallest
    _ip(sim.netns, ["link add eniold type veth peer name nloldp"])
    seen: list[NetEvent] = []
    hostnet = HostNet(prefixes=("eni",), netns=sim.netns, on_change=seen.append)
    task = asyncio.create_task(hostnet.run())
    try:
        await asyncio.wait_for(hostnet.ready.wait(), 10)
        old = hostnet.by_name["eniold"]
        with capture_logs() as logs:
            # the loop is blocked while the changes happen: nothing reads the queue
            _ip(
                sim.netns,
                [
                    *(f"link add enilost{i} type veth peer name nllost{i}" for i in range(150)),
                    "link del eniold",
                ],
            )
            for _ in range(200):
                await asyncio.sleep(0.05)
                if len(hostnet.pod_interfaces()) == 150 and "eniold" not in hostnet.by_name:
                    break
        assert [e for e in logs if e["event"] == "hostnet.changes_lost"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert set(hostnet.by_name) >= {f"enilost{i}" for i in range(150)}
    assert "eniold" not in hostnet.by_name
    assert NetEvent("link", False, link=Link(old, "eniold", "veth", False)) in seen
    async with Netlink(netns=sim.netns) as nl:
        assert {link.index: link for link in await nl.links()} == hostnet.links
