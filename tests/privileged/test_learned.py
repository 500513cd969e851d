"""Addresses learned from DNS answers (np_learned), on real veths with real packets: a
pod whose egress has domain-name rules reaches a learned address with the decision the
entry carries, until it expires; what was opened meanwhile goes on."""

from __future__ import annotations

import time

import pytest

from bpf import layout as lay
from bpf.datapath import DENY_ALL, Datapath, DirectionPolicy, PodPolicy
from bpf.ruleset import CompiledRules, Decision, PortRule, Portset
from simnode.node import SimPod
from simnode.traffic import open_tcp
from tests.privileged.podnet import PodNet

ISOLATED = DirectionPolicy(lay.NP_STATE_POLICIES_APPLIED, CompiledRules())  # nothing allowed
NOW = time.clock_gettime_ns  # the datapath's clock is CLOCK_MONOTONIC


def _monotonic_ns() -> int:
    return NOW(time.CLOCK_MONOTONIC)


@pytest.fixture
def pods(podnet: PodNet) -> PodNet:
    podnet.dp.set_host_addresses([podnet.sim.node_ipv4, podnet.sim.node_ipv6])
    return podnet


def _egress(pods: PodNet, pod: SimPod, *, learned: bool) -> None:
    rec = pods.dp.pod_record(pod.ifindex)
    assert rec is not None
    pods.dp.program_pods({pod.ifindex: PodPolicy(rec.pod_id, DENY_ALL, ISOLATED, learned=learned)})


async def test_a_learned_address_opens_until_it_expires(pods: PodNet) -> None:
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    _egress(pods, client, learned=True)
    # the server's ingress must let the client in: its own record allows everything
    assert not await pods.probe(client, server)
    pid = pods.dp.policy_id(namespace="default", name="to-api")
    only_80 = Portset(
        rules=(PortRule(lay.NP_PROTO_TCP, 80, 80, pid),),
        other=Decision(
            lay.NP_VERDICT_DENY, lay.NP_TIER_NETWORK_POLICY, lay.NP_REASON_NO_PORT_MATCH
        ),
    )
    expires = _monotonic_ns() + 3_000_000_000
    for family in (4, 6):
        pods.dp.learn(client.ifindex, server.address(family), only_80, expires)
    assert await pods.probe(client, server, family=4)
    assert await pods.probe(client, server, family=6)
    assert not await pods.probe(client, server, port=81), "the entry's ports only"
    conn = await open_tcp(netns=client.netns, target=server.ipv4, port=80)
    assert conn is not None
    try:
        assert await conn.exchange(b"while-valid", expect="server")
        # expired: new connections are judged by the trie again (denied) ...
        for family in (4, 6):
            pods.dp.learn(client.ifindex, server.address(family), only_80, _monotonic_ns() - 1)
        assert not await pods.probe(client, server, family=4)
        assert not await pods.probe(client, server, family=6)
        # ... and the one opened while it was valid goes on
        assert await conn.exchange(b"after-expiry", expect="server")
    finally:
        await conn.close()
    assert pods.dp.expire_learned(_monotonic_ns()) == (2, 0)
    assert list(pods.dp.learned.items()) == []
    pods.dp.collect_garbage()
    assert list(pods.dp.portsets.items()) == [], "the held port set is freed"


async def test_a_pod_without_domain_rules_ignores_learned_entries(pods: PodNet) -> None:
    client, server = await pods.add_pod("client"), await pods.add_pod("server")
    _egress(pods, client, learned=False)
    pid = pods.dp.policy_id(namespace="default", name="stale")
    allow = Portset(any_policy=pid)
    pods.dp.learn(client.ifindex, server.ipv4, allow, _monotonic_ns() + 10_000_000_000)
    assert not await pods.probe(client, server), "the record's flag decides"
    _egress(pods, client, learned=True)
    assert await pods.probe(client, server)
    # the pod goes: what it learned ends with it
    pods.dp.remove_pods([client.ifindex])
    assert list(pods.dp.learned.items()) == []


def test_churn_past_the_tables_capacity_evicts_and_releases(
    pin_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node lives for months: far more addresses are learned than the table holds.
    The LRU evicts (closing, never opening), and what evicted entries held is released."""
    import ipaddress

    monkeypatch.setenv("NP_MAP_SIZES", f"{lay.MAP_LEARNED}=64")
    dp = Datapath.open(pin_root, ct_entries=32768, events_bytes=1 << 16)
    try:
        pid = dp.policy_id(namespace="default", name="to-api")
        on_443 = Portset(
            rules=(PortRule(lay.NP_PROTO_TCP, 443, 443, pid),),
            other=Decision(
                lay.NP_VERDICT_DENY, lay.NP_TIER_NETWORK_POLICY, lay.NP_REASON_NO_PORT_MATCH
            ),
        )
        far = _monotonic_ns() + 3600 * 10**9
        for i in range(1000):
            dp.learn(7, ipaddress.ip_address(0x0A000000 + i), on_443, far)
        assert len(list(dp.learned.items())) <= 64
        expired, evicted = dp.expire_learned(_monotonic_ns())
        assert expired == 0
        assert evicted >= 1000 - 64
        assert len(dp.learned_for(7)) == len(list(dp.learned.items()))
        for address in list(dp.learned_for(7)):
            dp.forget(7, address)
        dp.collect_garbage()
        assert list(dp.portsets.items()) == [], "nothing holds the port set any more"
    finally:
        dp.close()
