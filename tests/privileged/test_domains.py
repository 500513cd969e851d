"""Domain-name egress end to end: a DNS server pod, the real agent with its DNS proxy,
PolicyEndpoints with domainName entries as the AWS controller writes them, real lookups
and real connections from pods."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from simnode.dnsserver import DnsServer, resolve
from simnode.node import SimNode, SimPod
from simnode.traffic import open_tcp, tcp_probe
from tests.privileged.agentrig import AgentRig

TCP4 = ("TCP", 4)


class World:
    def __init__(self, rig: AgentRig, dns: SimPod, server: DnsServer) -> None:
        self.rig, self.dns, self.server = rig, dns, server

    def domain_policy(self, client: SimPod, *names: str, port: int = 80) -> None:
        """Egress of ``client``: DNS to the DNS pod, and ``names`` on ``port``."""
        egress: list[dict[str, Any]] = [
            {"cidr": f"{ip}/{bits}", "ports": [{"protocol": "UDP", "port": 53}]}
            for ip, bits in ((self.dns.ipv4, 32), (self.dns.ipv6, 128))
        ]
        egress += [{"domainName": n, "ports": [{"protocol": "TCP", "port": port}]} for n in names]
        self.rig.apply(
            self.rig.policy_endpoint(
                "to-api-abcde",
                policy="to-api",
                targets=[client],
                isolation=["Egress"],
                egress=egress,
            )
        )

    async def lookup(self, client: SimPod, name: str, family: int = 4) -> list[Any] | None:
        return await resolve(
            netns=client.netns, server=self.dns.address(family), name=name, family=family
        )


@pytest.fixture
async def world(sim: SimNode, pin_root: str, tmp_path: Path) -> AsyncIterator[World]:
    rig = AgentRig(sim, pin_root=pin_root, workdir=tmp_path)
    await rig.start_api()
    dns_pod = await rig.add_pod("dns", namespace="kube-system", ports=())
    server = DnsServer(dns_pod.netns, ttl=3600)
    await server.start()
    try:
        await rig.start_agent(f"--cluster-dns={dns_pod.ipv4},{dns_pod.ipv6}", "--fqdn-ttl-grace=0")
        await rig.ready()
        yield World(rig, dns_pod, server)
    finally:
        await server.close()
        await rig.close()


async def test_allowed_and_denied_names_wildcards_and_cnames(world: World) -> None:
    rig = world.rig
    client = await rig.add_pod("client")
    api, other = await rig.add_pod("api"), await rig.add_pod("other")
    world.server.set("api.example.com", [str(api.ipv4), str(api.ipv6)])
    world.server.set("www.example.com", {"cname": "api.example.com"})
    world.server.set("s3.bucket.example.org", [str(other.ipv4)])
    world.server.set("evil.example.net", [str(other.ipv4)])
    world.domain_policy(client, "api.example.com", "*.example.org")
    await rig.settle_agent()
    # nothing learned yet: the addresses are closed
    assert not await tcp_probe(netns=client.netns, target=api.ipv4, port=80, expect="api")
    for family in (4, 6):
        got = await world.lookup(client, "API.example.com.", family)
        assert got == [api.address(family)]
        assert await tcp_probe(netns=client.netns, target=got[0], port=80, expect="api")
        assert not await tcp_probe(netns=client.netns, target=got[0], port=81, expect="api")
    # explain says why, np-cli fqdn lists it, the metric counts it
    answer = await rig.explain("default/client", api, direction="egress")
    assert answer["verdict"] == "ALLOW"
    assert answer["summary"].startswith("allowed because API.example.com resolved to it at ")
    assert "TTL 3600" in answer["summary"]
    listed = await rig.acli("fqdn", "default/client", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {(r["address"], r["name"]) for r in json.loads(listed.stdout)}
    assert (str(api.ipv4), "API.example.com.") in rows
    assert (str(api.ipv6), "API.example.com.") in rows
    _, metrics = await rig.http(8162, "/metrics")
    assert "awsnodeagent_fqdn_addresses_learned_total 2.0" in metrics
    # a wildcard: one or more labels
    got = await world.lookup(client, "s3.bucket.example.org")
    assert got == [other.ipv4]
    assert await tcp_probe(netns=client.netns, target=other.ipv4, port=80, expect="other")
    # a CNAME is judged by the asked name: www is not allowed, its target is
    third = await rig.add_pod("client2")
    world.domain_policy(third, "api.example.com")  # replaces client's policy object
    await rig.settle_agent()
    got = await world.lookup(third, "www.example.com")
    assert got == [api.ipv4]
    assert not await tcp_probe(netns=third.netns, target=api.ipv4, port=80, expect="api")
    # a name no rule matches teaches nothing
    await world.lookup(third, "evil.example.net")
    assert not await tcp_probe(netns=third.netns, target=other.ipv4, port=80, expect="other")


async def test_the_first_connection_after_each_lookup_passes(world: World) -> None:
    """1,000 lookups, each followed at once by a connection to the answer: none fails."""
    rig = world.rig
    client, api = await rig.add_pod("client"), await rig.add_pod("api")
    names = [f"n{i}.example.com" for i in range(1000)]
    for n in names:
        world.server.set(n, [str(api.ipv4)])
    world.domain_policy(client, "*.example.com")
    await rig.settle_agent()
    failures = 0
    started = time.monotonic()
    for n in names:
        got = await world.lookup(client, n)
        ok = got is not None and await tcp_probe(
            netns=client.netns, target=got[0], port=80, expect="api", timeout=1.0
        )
        failures += not ok
    assert failures == 0, f"{failures} of 1000 first connections failed"
    assert time.monotonic() - started < 120


async def test_expiry_closes_new_connections_and_keeps_open_ones(world: World) -> None:
    rig = world.rig
    client, api = await rig.add_pod("client"), await rig.add_pod("api")
    world.server.ttl = 1
    world.server.set("api.example.com", [str(api.ipv4)])
    world.domain_policy(client, "api.example.com")
    await rig.settle_agent()
    got = await world.lookup(client, "api.example.com")
    assert got == [api.ipv4]
    conn = await open_tcp(netns=client.netns, target=api.ipv4, port=80)
    assert conn is not None
    try:
        assert await conn.exchange(b"fresh", expect="api")
        await asyncio.sleep(1.5)  # TTL 1 s, grace 0
        assert not await tcp_probe(netns=client.netns, target=api.ipv4, port=80, expect="api")
        assert await conn.exchange(b"still-open", expect="api")
    finally:
        await conn.close()
    # asked again: open again
    assert await world.lookup(client, "api.example.com") == [api.ipv4]
    assert await tcp_probe(netns=client.netns, target=api.ipv4, port=80, expect="api")


async def test_another_resolver_teaches_nothing(world: World) -> None:
    rig = world.rig
    client, api = await rig.add_pod("client"), await rig.add_pod("api")
    rogue_pod = await rig.add_pod("rogue", ports=())
    rogue = DnsServer(rogue_pod.netns)
    rogue.set("api.example.com", [str(api.ipv4)])
    await rogue.start()
    try:
        world.domain_policy(client, "api.example.com")
        # let the client ask the rogue resolver too (its DNS traffic is allowed by CIDR)
        body = rig.policy_endpoint(
            "rogue-dns-abcde",
            policy="rogue-dns",
            targets=[client],
            isolation=["Egress"],
            egress=[{"cidr": f"{rogue_pod.ipv4}/32", "ports": [{"protocol": "UDP", "port": 53}]}],
        )
        rig.apply(body)
        await rig.settle_agent()
        got = await resolve(netns=client.netns, server=rogue_pod.ipv4, name="api.example.com")
        assert got == [api.ipv4]
        assert not await tcp_probe(netns=client.netns, target=api.ipv4, port=80, expect="api")
    finally:
        await rogue.close()


async def test_garbage_to_the_proxy_breaks_nothing(world: World) -> None:
    import os
    import socket

    from simnode.netns import socket_in

    rig = world.rig
    client, api = await rig.add_pod("client"), await rig.add_pod("api")
    world.server.set("api.example.com", [str(api.ipv4)])
    world.domain_policy(client, "api.example.com")
    await rig.settle_agent()
    loop = asyncio.get_running_loop()
    for payload in (os.urandom(3), os.urandom(600), b"\0" * 4000):
        sock = socket_in(client.netns, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            await loop.sock_connect(sock, (str(world.dns.ipv4), 53))
            await loop.sock_sendall(sock, payload)
        finally:
            sock.close()
    assert await world.lookup(client, "api.example.com") == [api.ipv4]
    assert await tcp_probe(netns=client.netns, target=api.ipv4, port=80, expect="api")
    assert rig.proc is not None
    assert rig.proc.returncode is None, "the agent survived"


async def test_agent_restart_keeps_what_pods_learned(world: World) -> None:
    rig = world.rig
    client, api = await rig.add_pod("client"), await rig.add_pod("api")
    world.server.set("api.example.com", [str(api.ipv4)])
    world.domain_policy(client, "api.example.com")
    await rig.settle_agent()
    assert await world.lookup(client, "api.example.com") == [api.ipv4]
    conn = await open_tcp(netns=client.netns, target=api.ipv4, port=80)
    assert conn is not None
    try:
        assert await conn.exchange(b"before", expect="api")
        assert await rig.stop_agent() == 0
        # while the agent is down: the learned address stays open, the flow goes on
        assert await tcp_probe(netns=client.netns, target=api.ipv4, port=80, expect="api")
        assert await conn.exchange(b"agent-down", expect="api")
        await rig.start_agent(
            f"--cluster-dns={world.dns.ipv4},{world.dns.ipv6}", "--fqdn-ttl-grace=0"
        )
        await rig.ready()
        await rig.settle_agent()
        # adopted: no new lookup needed, and DNS works again through the proxy
        assert await tcp_probe(netns=client.netns, target=api.ipv4, port=80, expect="api")
        assert await conn.exchange(b"after", expect="api")
        assert await world.lookup(client, "api.example.com") == [api.ipv4]
    finally:
        await conn.close()
