"""The real enforcer process against the fake API server, proven with real traffic."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from bpf import layout as lay
from bpf.attach import attachment
from bpf.datapath import Datapath
from bpf.maps import Map
from bpf.pins import TRIES_DIR
from bpf.store import POOL_SIZE
from common.netlink import Netlink
from fakekube import store as fs
from simnode.node import SimPod
from tests.privileged.agentrig import AgentRig, allow_from, eventually


async def test_policyendpoints_are_enforced_updated_and_removed(rig: AgentRig) -> None:
    server = await rig.add_pod("server")
    c1, c2 = await rig.add_pod("client1"), await rig.add_pod("client2")
    await rig.start_agent()
    await rig.ready()
    cases = [
        (c1, server, 80, "TCP", 4),
        (c2, server, 80, "TCP", 4),
        (c1, server, 80, "UDP", 6),
        (c2, server, 81, "TCP", 6),
    ]
    await rig.converge(cases, [True, True, True, True])

    rig.apply(
        rig.policy_endpoint("web-abc12", policy="web", targets=[server], ingress=allow_from(c1))
    )
    await rig.converge(cases, [True, False, True, False])

    rig.apply(
        rig.policy_endpoint(
            "web-abc12",
            policy="web",
            targets=[server],
            ingress=allow_from(c2, ports=[{"protocol": "TCP", "port": 81}]),
        )
    )
    await rig.converge(cases, [False, False, False, True])

    rig.delete("web-abc12")
    await rig.converge(cases, [True, True, True, True])


async def test_strict_mode_denies_new_pods_from_their_first_packet(strict_rig: AgentRig) -> None:
    rig = strict_rig
    client = await rig.add_pod("client")
    await rig.start_agent()
    await rig.ready()
    # a pod with no policy is default-deny in strict mode (the node still gets through)
    server = await rig.add_pod("server", create_object=False)
    # the veth was attached at its first appearance, before the API knows the pod
    first = await rig.matrix(
        [
            (client, server, 80, "TCP", 4),
            (client, server, 80, "UDP", 6),
            (None, server, 80, "TCP", 4),
        ]
    )
    assert first == [False, False, True]
    rig.create_pod_object(server)
    rig.apply(
        rig.policy_endpoint(
            "allow-client-x1", policy="allow-client", targets=[server], ingress=allow_from(client)
        )
    )
    cases = [
        (client, server, 80, "TCP", 4),
        (client, server, 80, "UDP", 6),
        (server, client, 80, "TCP", 4),
    ]
    # the client has no policy yet: in strict mode its own egress is denied too
    await asyncio.sleep(1)
    assert await rig.matrix(cases) == [False, False, False]
    rig.apply(
        rig.policy_endpoint(
            "client-egress-x2",
            policy="client-egress",
            targets=[client],
            isolation=["Egress"],
            egress=allow_from(server),
        )
    )
    # both have policies now; directions no policy isolates allow everything
    await rig.converge(cases, [True, True, True])
    rig.delete("allow-client-x1")  # the server is back to strict default deny
    await rig.converge(cases, [False, False, False])


async def test_invalid_policyendpoint_is_rejected_and_disturbs_nothing(rig: AgentRig) -> None:
    s1, s2 = await rig.add_pod("s1"), await rig.add_pod("s2")
    c1, c2 = await rig.add_pod("c1"), await rig.add_pod("c2")
    await rig.start_agent()
    await rig.ready()
    rig.apply(rig.policy_endpoint("p1-aaaaa", policy="p1", targets=[s1], ingress=allow_from(c1)))
    rig.apply(rig.policy_endpoint("p2-bbbbb", policy="p2", targets=[s2], ingress=allow_from(c1)))
    cases = [
        (c1, s1, 80, "TCP", 4),
        (c2, s1, 80, "TCP", 4),
        (c1, s2, 80, "TCP", 4),
        (c2, s2, 80, "TCP", 4),
    ]
    await rig.converge(cases, [True, False, True, False])

    bad = rig.policy_endpoint(
        "p2-bbbbb", policy="p2", targets=[s2], ingress=[{"cidr": "10.66.0.300/32"}]
    )
    rig.apply(bad)  # an update that breaks p2: its last good version stays in force
    extra = rig.policy_endpoint(
        "p3-ccccc",
        policy="p3",
        targets=[s1],
        ingress=[{"cidr": "10.66.0.0/16", "ports": [{"protocol": "TCP", "port": 70000}]}],
    )
    rig.apply(extra)  # a new invalid one for s1: ignored
    await eventually(
        lambda: _rejected(rig, {"p2-bbbbb", "p3-ccccc"}), timeout=10, what="rejection log lines"
    )
    assert await rig.matrix(cases) == [True, False, True, False]
    _, metrics = await rig.http(8162, "/metrics")
    assert (
        'awsnodeagent_policyendpoint_rejected_total{name="p2-bbbbb",namespace="default"}' in metrics
    )
    assert (
        'awsnodeagent_policyendpoint_rejected_total{name="p3-ccccc",namespace="default"}' in metrics
    )
    # other pods keep being programmed normally
    rig.apply(rig.policy_endpoint("p1-aaaaa", policy="p1", targets=[s1], ingress=allow_from(c2)))
    await rig.converge(cases, [False, True, True, False])


async def _rejected(rig: AgentRig, names: set[str]) -> bool:
    lines = [ln for ln in rig.log_lines() if ln.get("event") == "policyendpoint.rejected"]
    seen = {ln["name"] for ln in lines}
    for ln in lines:
        assert ln["reason"], "a rejection says why"
    return names <= seen


class ContinuousTraffic:
    """New flows, continuously and densely, from an allowed and a denied client."""

    def __init__(self, rig: AgentRig, *, good: SimPod, bad: SimPod, target: SimPod) -> None:
        self.rig, self.good, self.bad, self.target = rig, good, bad, target
        self.allowed: list[bool] = []
        self.denied: list[bool] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self, client: SimPod, out: list[bool], family: int, proto: str) -> None:
        while not self._stop.is_set():
            out.append(
                await self.rig.probe(
                    client, self.target, family=family, protocol=proto, timeout=0.25
                )
            )

    def start(self) -> None:
        for i in range(4):
            self._tasks.append(
                asyncio.create_task(
                    self._loop(
                        self.good, self.allowed, 4 if i % 2 else 6, "TCP" if i < 2 else "UDP"
                    ),
                    name=f"allowed-{i}",
                )
            )
        for i in range(8):
            self._tasks.append(
                asyncio.create_task(
                    self._loop(self.bad, self.denied, 4 if i % 2 else 6, "TCP" if i < 4 else "UDP"),
                    name=f"denied-{i}",
                )
            )

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def check(self) -> None:
        assert len(self.allowed) > 40, "enough allowed flows were tried"
        assert len(self.denied) > 40, "enough denied flows were tried"
        assert all(self.allowed), f"{self.allowed.count(False)} allowed flows dropped"
        assert not any(self.denied), f"{sum(self.denied)} denied flows passed"


def adopted_records(rig: AgentRig) -> list[int]:
    return [ln["pods"] for ln in rig.log_lines() if ln.get("event") == "datapath.adopted"]


async def filters_point_at_pinned_programs(rig: AgentRig, pod: SimPod) -> bool:
    async with Netlink(netns=rig.sim.netns) as nl:
        current = await attachment(nl, pod.ifindex)
    return (current.ingress_prog_id, current.egress_prog_id) == rig.pinned_program_ids()


async def test_enforcement_never_lapses_across_restarts_and_kill9(rig: AgentRig) -> None:
    server = await rig.add_pod("server")
    good, bad = await rig.add_pod("good"), await rig.add_pod("bad")
    await rig.start_agent()
    await rig.ready()
    rig.apply(
        rig.policy_endpoint("web-00001", policy="web", targets=[server], ingress=allow_from(good))
    )
    await rig.converge([(good, server, 80, "TCP", 4), (bad, server, 80, "TCP", 4)], [True, False])
    traffic = ContinuousTraffic(rig, good=good, bad=bad, target=server)
    traffic.start()
    try:
        await asyncio.sleep(0.5)
        assert await rig.stop_agent(signal.SIGTERM) == 0, "SIGTERM drains and exits cleanly"
        await asyncio.sleep(0.5)  # no agent at all: still enforced
        await rig.start_agent()
        await rig.ready()
        await asyncio.sleep(0.5)
        await rig.stop_agent(signal.SIGKILL)  # kill -9
        await asyncio.sleep(0.3)
        await rig.start_agent()
        await rig.ready()
        await asyncio.sleep(0.5)
    finally:
        await traffic.stop()
    traffic.check()
    assert adopted_records(rig)[1:] == [3, 3], "each restart adopted the three pinned pods"
    assert await filters_point_at_pinned_programs(rig, server)
    rig.apply(
        rig.policy_endpoint("web-00001", policy="web", targets=[server], ingress=allow_from(bad))
    )
    await rig.converge([(good, server, 80, "TCP", 4), (bad, server, 80, "TCP", 4)], [False, True])


def programmed_lines(rig: AgentRig) -> list[dict[str, Any]]:
    return [ln for ln in rig.log_lines() if ln.get("event") == "enforcer.programmed"]


async def test_a_restart_confirms_unchanged_records_and_compiles_changed_ones(
    rig: AgentRig,
) -> None:
    """Each record carries the digest of its inputs (np_pod_inputs): a restarted agent
    confirms the records whose PolicyEndpoints did not change without compiling them,
    and compiles the pod whose PolicyEndpoint changed while it was down."""
    web, db = await rig.add_pod("web"), await rig.add_pod("db")
    good, bad = await rig.add_pod("good"), await rig.add_pod("bad")
    await rig.start_agent()
    await rig.ready()
    rig.apply(
        rig.policy_endpoint("web-0000a", policy="web", targets=[web], ingress=allow_from(good))
    )
    rig.apply(rig.policy_endpoint("db-0000b", policy="db", targets=[db], ingress=allow_from(good)))
    flows = [(good, web, 80, "TCP", 4), (bad, web, 80, "TCP", 4), (good, db, 80, "TCP", 4)]
    flows.append((bad, db, 80, "TCP", 4))
    await rig.converge(flows, [True, False, True, False])
    assert await rig.stop_agent(signal.SIGTERM) == 0
    # while the agent is down, db's policy changes; web's does not
    rig.apply(rig.policy_endpoint("db-0000b", policy="db", targets=[db], ingress=allow_from(bad)))
    seen = len(programmed_lines(rig))
    await rig.start_agent()
    await rig.ready()
    await rig.converge(flows, [True, False, False, True])
    first = programmed_lines(rig)[seen]
    # the four pods of the first reconcile: web, good and bad confirmed, db compiled
    assert first["pods"] == 4, first
    assert first["confirmed"] == 3, first


async def test_lost_pins_are_recovered_from_the_attached_programs(rig: AgentRig) -> None:
    server = await rig.add_pod("server")
    good, bad = await rig.add_pod("good"), await rig.add_pod("bad")
    await rig.start_agent()
    await rig.ready()
    rig.apply(
        rig.policy_endpoint("web-00002", policy="web", targets=[server], ingress=allow_from(good))
    )
    await rig.converge([(good, server, 80, "TCP", 4), (bad, server, 80, "TCP", 4)], [True, False])
    await rig.stop_agent(signal.SIGTERM)
    Datapath.unpin(rig.pin_root)  # bpffs state lost while the agent is down
    traffic = ContinuousTraffic(rig, good=good, bad=bad, target=server)
    traffic.start()
    try:
        await asyncio.sleep(0.3)
        await rig.start_agent()
        await rig.ready()
        await asyncio.sleep(0.5)
    finally:
        await traffic.stop()
    traffic.check()
    recovered = [ln for ln in rig.log_lines() if ln.get("event") == "datapath.recovered"]
    assert recovered, "the live maps were pinned again from the attached program"
    assert adopted_records(rig)[-1] == 3
    assert await filters_point_at_pinned_programs(rig, server)


async def test_410_and_api_outage_are_survived(rig: AgentRig) -> None:
    server, c1, c2 = (await rig.add_pod("server"), await rig.add_pod("c1"), await rig.add_pod("c2"))
    await rig.start_agent()
    await rig.ready()
    cases = [(c1, server, 80, "TCP", 4), (c2, server, 80, "TCP", 4)]
    rig.apply(
        rig.policy_endpoint("web-11111", policy="web", targets=[server], ingress=allow_from(c1))
    )
    await rig.converge(cases, [True, False])

    # the watch is cut and its history compacted: the change made meanwhile comes with
    # the re-list, and the removal of a PolicyEndpoint seen by nobody too
    await rig.api.drop_watches()
    rig.apply(
        rig.policy_endpoint("web-11111", policy="web", targets=[server], ingress=allow_from(c2))
    )
    rig.api.compact()
    await rig.converge(cases, [False, True])

    # the API server is unreachable: enforcement stays, changes land once it is back
    await rig.api.pause()
    rig.apply(
        rig.policy_endpoint("web-11111", policy="web", targets=[server], ingress=allow_from(c1, c2))
    )
    await asyncio.sleep(2)
    assert await rig.matrix(cases) == [False, True]
    await rig.api.resume()
    await rig.converge(cases, [True, True], timeout=20)
    assert rig.proc is not None
    assert rig.proc.returncode is None, "the agent survived"
    events = {ln.get("event") for ln in rig.log_lines()}
    assert {"watch.gone", "watch.failed"} <= events


async def test_deleted_pods_leave_nothing_behind(rig: AgentRig) -> None:
    server, client = await rig.add_pod("server"), await rig.add_pod("client")
    await rig.start_agent()
    await rig.ready()
    rig.apply(
        rig.policy_endpoint("web-22222", policy="web", targets=[server], ingress=allow_from(client))
    )
    await rig.converge([(client, server, 80, "TCP", 4)], [True])
    assert server.ifindex in rig.records()
    rig.api.store.delete(fs.PODS, "default", "server")
    await rig.servers.pop("server").close()
    await rig.sim.remove_pod("server")
    await eventually(
        lambda: _no_record(rig, server.ifindex),
        timeout=10,
        what="record of the deleted pod removed",
    )
    assert client.ifindex in rig.records()


async def _no_record(rig: AgentRig, ifindex: int) -> bool:
    return ifindex not in rig.records()


async def test_replaced_rule_sets_are_freed(rig: AgentRig) -> None:
    """Every policy change retires a trie; retired tries leave np_rules and their pins
    (once programming is quiet), and only the ones records point at remain, next to the
    pool of empty tries kept ready."""
    server, client = await rig.add_pod("server"), await rig.add_pod("client")
    await rig.start_agent()
    await rig.ready()
    for port in (82, 83, 84, 85, 86, 81):  # six rule sets; the servers listen on 80, 81
        rig.apply(
            rig.policy_endpoint(
                "web-33333",
                policy="web",
                targets=[server],
                ingress=allow_from(client, ports=[{"protocol": "TCP", "port": port}]),
            )
        )
        await rig.settle_agent()
    await rig.converge(
        [(client, server, 81, "TCP", 4), (client, server, 80, "TCP", 4)], [True, False]
    )
    await eventually(
        lambda: _only_live_tries(rig),
        timeout=10,
        what="retired tries removed from np_rules and unpinned",
    )


async def _only_live_tries(rig: AgentRig) -> bool:
    live = {
        t
        for rec in rig.records().values()
        for t in (rec.ingress_trie, rec.egress_trie)
        if t != lay.NP_TRIE_NONE
    }
    with Map.from_pin(os.path.join(rig.pin_root, "maps", lay.MAP_RULES)) as rules:
        in_map = {int.from_bytes(k, "little") for k in rules}
    pinned = {int(n) for n in os.listdir(os.path.join(rig.pin_root, TRIES_DIR))}
    # the rest of np_rules is the pool of empty tries kept ready (bpf.store)
    pool = in_map - live
    empty = all(not list(_trie(rig, t)) for t in pool)
    return (
        len(live) == 1
        and live <= in_map
        and len(pool) == POOL_SIZE
        and empty
        and (pinned == in_map)
    )


def _trie(rig: AgentRig, trie_id: int) -> list[bytes]:
    with Map.from_pin(os.path.join(rig.pin_root, TRIES_DIR, str(trie_id))) as trie:
        return list(trie)


async def test_host_network_pods_are_never_enforced(rig: AgentRig) -> None:
    server, client = await rig.add_pod("server"), await rig.add_pod("client")
    rig.api.store.create(
        fs.PODS,
        "kube-system",
        {
            "metadata": {"name": "hostnet", "namespace": "kube-system"},
            "spec": {"nodeName": "node-1", "hostNetwork": True},
            "status": {
                "phase": "Running",
                "podIP": str(rig.sim.node_ipv4),
                "podIPs": [{"ip": str(rig.sim.node_ipv4)}],
            },
        },
    )
    await rig.start_agent()
    await rig.ready()
    pe = rig.policy_endpoint(
        "deny-all-33333", policy="deny-all", targets=[server], namespace="default"
    )
    pe["spec"]["podSelectorEndpoints"].append(
        {
            "podIP": str(rig.sim.node_ipv4),
            "hostIP": str(rig.sim.node_ipv4),
            "name": "hostnet",
            "namespace": "kube-system",
        }
    )
    rig.apply(pe)
    await rig.converge(
        [(client, server, 80, "TCP", 4), (None, server, 80, "TCP", 4)], [False, True]
    )
    assert set(rig.records()) == {server.ifindex, client.ifindex}


async def test_union_of_policyendpoints_and_both_directions(rig: AgentRig) -> None:
    server, c1, c2 = (await rig.add_pod("server"), await rig.add_pod("c1"), await rig.add_pod("c2"))
    await rig.start_agent()
    await rig.ready()
    # one policy split over two PolicyEndpoints, plus another policy isolating egress
    rig.apply(
        rig.policy_endpoint("web-aaaaa", policy="web", targets=[server], ingress=allow_from(c1))
    )
    rig.apply(
        rig.policy_endpoint(
            "web-bbbbb",
            policy="web",
            targets=[server],
            ingress=allow_from(c2, ports=[{"protocol": "UDP"}]),
        )
    )
    rig.apply(
        rig.policy_endpoint(
            "egress-ccccc",
            policy="egress",
            targets=[server],
            isolation=["Egress"],
            egress=allow_from(c1, ports=[{"protocol": "TCP", "port": 81}]),
        )
    )
    await rig.converge(
        [
            (c1, server, 80, "TCP", 4),
            (c2, server, 80, "TCP", 4),
            (c2, server, 81, "UDP", 6),
            (server, c1, 81, "TCP", 4),
            (server, c1, 80, "TCP", 6),
            (server, c2, 81, "TCP", 4),
        ],
        [True, False, True, True, False, False],
    )


async def test_readiness_metrics_and_programming_latency(rig: AgentRig) -> None:
    server, client = await rig.add_pod("server"), await rig.add_pod("client")
    other = await rig.add_pod("other")
    await rig.start_agent()
    await rig.ready()
    assert (await rig.http(8163, "/healthz"))[0] == 200
    stamp = asyncio.get_running_loop().time()
    from datetime import UTC, datetime

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    rig.apply(
        rig.policy_endpoint(
            "web-44444",
            policy="web",
            targets=[server],
            ingress=allow_from(client),
            trigger_time=now,
        )
    )
    # the denied peer proves the policy is programmed before metrics are read
    await rig.converge(
        [(client, server, 80, "TCP", 4), (other, server, 80, "TCP", 4)], [True, False]
    )
    # metrics are recorded right after the maps switch; allow the loop to catch up
    count: list[str] = []
    for _ in range(50):
        _, text = await rig.http(8162, "/metrics")
        count = [
            ln
            for ln in text.splitlines()
            if ln.startswith("awsnodeagent_policy_programming_latency_seconds_count")
        ]
        if count and float(count[0].split()[-1]) >= 1:
            break
        await asyncio.sleep(0.05)
    assert count
    assert float(count[0].split()[-1]) >= 1
    setup = 'awsnodeagent_policy_setup_latency_ms_count{name="web-44444",namespace="default"}'
    assert setup in text
    assert asyncio.get_running_loop().time() - stamp < 10
