"""The VPC CNI's calls, made as the CNI makes them: real gRPC over the agent's Unix
socket, from a simulated node that wires pods the VPC CNI's way (veths named after the
pod, EnforceNpToPod before the pod's first packet, DeletePodNp at teardown).

A pod's life here follows the real order: the Pod object exists (scheduled, no address)
before the CNI wires it; the CNI's call is answered; then the kubelet writes the pod's
addresses and its containers start.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from typing import Any

import grpc
import pytest

from agent.cni.service import NpClient
from simnode.node import CniRefusedError, SimPod
from simnode.traffic import PodServer, tcp_probe, udp_probe
from tests.privileged.agentrig import AgentRig, allow_from, eventually

pytestmark = pytest.mark.privileged

WEB = {"app": "web"}


def cni_node(rig: AgentRig, mode: str) -> None:
    rig.sim.cni_socket = rig.npa_socket
    rig.sim.mode = mode
    rig.mode = mode


async def start(rig: AgentRig, *extra: str) -> None:
    await rig.start_agent(*extra)
    await rig.ready()


async def cni_pod(
    rig: AgentRig,
    name: str,
    labels: dict[str, str],
    *,
    with_object: bool = True,
    serve: bool = True,
    **wiring: Any,
) -> SimPod:
    if with_object:
        rig.schedule_pod(name, labels=labels)
    pod = await rig.sim.add_pod(name, labels=labels, **wiring)  # EnforceNpToPod inside
    rig.pods[name] = pod
    if serve:
        server = PodServer(name=name, netns=pod.netns)
        await server.start()
        rig.servers[name] = server
    return pod


def web_policy(rig: AgentRig, listed: list[SimPod], allowed: list[SimPod]) -> dict[str, Any]:
    """Pods labelled app=web accept only ``allowed`` (the controller lists ``listed``)."""
    return rig.policy_endpoint(
        "web-abcde",
        policy="web",
        targets=listed,
        pod_selector={"matchLabels": WEB},
        ingress=allow_from(*allowed),
    )


async def node_pods(rig: AgentRig) -> tuple[SimPod, SimPod, SimPod]:
    """A running web replica, an allowed client and a denied one (node-wired pods). The
    clients' own policy lets them send anywhere (strict mode denies a pod that no policy
    selects)."""
    first = await rig.add_pod("web-1", labels=WEB)
    allowed = await rig.add_pod("client", labels={"app": "client"})
    denied = await rig.add_pod("other", labels={"app": "other"})
    rig.open_policy("clients", [allowed, denied])
    return first, allowed, denied


# ---- strict: the answer comes once the policies are in force ------------------------
async def test_strict_answer_comes_after_the_known_policies_are_programmed(
    rig: AgentRig,
) -> None:
    first, allowed, denied = await node_pods(rig)  # running before the CNI calls begin
    cni_node(rig, "strict")
    rig.apply(web_policy(rig, [first], [allowed]))
    await start(rig, "--cni-answer-timeout=10")
    await rig.settle_agent()

    started = time.monotonic()
    new = await cni_pod(rig, "web-2", WEB)  # no object lists it: selected by its labels
    answered = time.monotonic() - started
    # the first packets after the answer: the allowed peer's connection passes, the
    # denied peer's datagram is dropped, before the kubelet has even written the address
    denied_first = await udp_probe(netns=denied.netns, target=new.ipv4, port=80, timeout=0.5)
    allowed_first = await tcp_probe(
        netns=allowed.netns, target=new.ipv4, port=80, timeout=1.0, expect="web-2"
    )
    assert allowed_first, "the allowed peer's first connection after the answer failed"
    assert not denied_first, "the denied peer's first datagram after the answer passed"
    assert rig.servers["web-2"].udp_received[str(denied.ipv4)] == 0
    lines = [ln for ln in rig.log_lines() if ln.get("event") == "cni.pod_admitted"]
    assert lines, "no cni.pod_admitted line"
    assert lines[-1]["programmed"] is True, lines
    assert answered < 10
    # and once the kubelet writes its address and the controller lists it, it stays so
    rig.pod_running(new)
    rig.apply(web_policy(rig, [first, new], [allowed]))
    await rig.settle_agent()
    assert await rig.probe(allowed, new)
    assert not await rig.probe(denied, new, protocol="UDP")


async def test_strict_unknown_pod_answers_after_the_bound_with_default_deny(
    rig: AgentRig,
) -> None:
    _, allowed, _ = await node_pods(rig)  # running before the CNI calls begin
    cni_node(rig, "strict")
    await start(rig, "--cni-answer-timeout=1")
    await rig.settle_agent()
    started = time.monotonic()
    new = await cni_pod(rig, "stranger", WEB, with_object=False)
    waited = time.monotonic() - started
    assert 0.9 <= waited < 5, waited
    assert not await rig.probe(allowed, new), "strict: an unknown pod must be denied"
    warned = [ln for ln in rig.log_lines() if ln.get("event") == "cni.answered_before_programmed"]
    assert warned, "no cni.answered_before_programmed line"
    assert warned[-1]["enforcing"] == "default deny", warned
    record = rig.records()[new.ifindex]
    assert record.pod_id == 0  # the default, no identity yet
    # the object arrives with a policy allowing the client: programmed then
    rig.schedule_pod("stranger", labels=WEB)
    rig.pod_running(new)
    rig.apply(web_policy(rig, [new], [allowed]))
    await rig.settle_agent()
    assert await rig.probe(allowed, new)


async def test_standard_answers_at_once_and_the_call_mode_overrides_the_node(
    rig: AgentRig,
) -> None:
    _, allowed, _ = await node_pods(rig)  # running before the CNI calls begin
    cni_node(rig, "strict")
    await start(rig, "--cni-answer-timeout=5")
    await rig.settle_agent()
    rig.sim.mode = "standard"  # this pod's call says standard on a strict node
    started = time.monotonic()
    new = await cni_pod(rig, "relaxed", {"app": "relaxed"}, with_object=False)
    # far below the 5 s bound a strict call would wait for the unknown pod
    assert time.monotonic() - started < 2.5, "standard mode must not wait for the unknown pod"
    assert await rig.probe(allowed, new), "standard: default allow"
    # once known (no policy selects it), the pod's own mode still decides
    rig.schedule_pod("relaxed", labels={"app": "relaxed"})
    rig.pod_running(new)
    await rig.settle_agent()
    assert await rig.probe(allowed, new)


# ---- bad requests, deletion, concurrency ----------------------------------------------
async def test_bad_requests_get_error_answers_and_the_agent_keeps_serving(
    rig: AgentRig,
) -> None:
    cni_node(rig, "standard")
    await start(rig)
    mode = stat.S_IMODE(os.stat(rig.npa_socket).st_mode)
    assert mode == 0o600, oct(mode)
    client = NpClient(rig.npa_socket)
    try:
        assert await client.healthy()
        assert await client.healthy("")
        cases = [
            ({"namespace": "default", "name": "x", "mode": "lenient"}, "INVALID_ARGUMENT"),
            ({"namespace": "default", "name": "", "mode": "strict"}, "INVALID_ARGUMENT"),
            ({"namespace": "Bad_NS", "name": "x", "mode": "strict"}, "INVALID_ARGUMENT"),
            (
                {"namespace": "default", "name": "x", "mode": "strict", "interfaces": 99},
                "INVALID_ARGUMENT",
            ),
            (
                {"namespace": "default", "name": "x", "mode": "strict", "interfaces": -1},
                "INVALID_ARGUMENT",
            ),
            ({"namespace": "default", "name": "no-such-pod", "mode": "strict"}, "NOT_FOUND"),
        ]
        for kwargs, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.enforce(timeout=5, **kwargs)  # type: ignore[arg-type]
            assert err.value.code().name == code, (kwargs, err.value.details())
        for body in (b"\xff\xff\xff", b"\x0a\xff", os.urandom(300), b"\x0a" * 70000):
            with pytest.raises(grpc.aio.AioRpcError):
                await client.raw("EnforceNpToPod", body)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.delete(namespace="default", name="-bad-", timeout=5)
        assert err.value.code().name == "INVALID_ARGUMENT"
        # never a crash: the agent answers, and a good call still succeeds
        assert await client.delete(namespace="default", name="never-seen", timeout=5)
        assert await client.healthy()
        pod = await cni_pod(rig, "after", {"app": "after"}, with_object=False, serve=False)
        assert pod.ifindex in rig.records()
    finally:
        await client.close()
    assert rig.proc is not None
    assert rig.proc.returncode is None
    refused = [ln for ln in rig.log_lines() if ln.get("event") == "cni.refused"]
    assert len(refused) >= len(cases)


async def test_delete_releases_the_pod_and_calls_are_idempotent(rig: AgentRig) -> None:
    cni_node(rig, "strict")
    await start(rig)
    pod = await cni_pod(rig, "short", {"app": "short"})
    rig.pod_running(pod)
    await rig.settle_agent()
    programmed = rig.records()[pod.ifindex]
    assert programmed.pod_id != 0
    client = NpClient(rig.npa_socket)
    try:
        # a repeated ADD changes nothing
        assert await client.enforce(namespace="default", name="short", mode="strict")
        assert rig.records()[pod.ifindex].pod_id == programmed.pod_id
        assert await client.delete(namespace="default", name="short")
        assert await client.delete(namespace="default", name="short")  # again: still fine
    finally:
        await client.close()

    async def released() -> bool:
        out = await rig.acli("pods", "--json")
        view = next(v for v in json.loads(out.stdout) if v["name"] == "short")
        return bool(view["ifindex"] == 0 and rig.records()[pod.ifindex].pod_id == 0)

    # the record stays (no identity, the node's default: deny) while the veth lasts
    await eventually(released, timeout=10, what="the pod's state released")
    await rig.servers.pop("short").close()  # the containers are gone before the sandbox
    await rig.sim.remove_pod("short")
    await eventually(
        lambda: _no_record(rig, pod.ifindex), timeout=10, what="the record removed with the veth"
    )


async def _no_record(rig: AgentRig, ifindex: int) -> bool:
    return ifindex not in rig.records()


async def test_200_concurrent_calls_each_pod_once(rig: AgentRig) -> None:
    cni_node(rig, "strict")
    await start(rig)
    rig.sim.call_cni = False  # wire 40 pods without calling; the calls come together
    pods = [await rig.sim.add_pod(f"many-{i}", labels={"app": "many"}) for i in range(40)]
    rig.sim.call_cni = True
    for pod in pods[:20]:
        rig.schedule_pod(pod.name, labels={"app": "many"})
    client = NpClient(rig.npa_socket)
    try:
        started = time.monotonic()
        calls = [
            client.enforce(namespace="default", name=p.name, mode="strict", timeout=30)
            for p in pods
            for _ in range(5)
        ]
        answers = await asyncio.gather(*calls)
        elapsed = time.monotonic() - started
    finally:
        await client.close()
    assert answers == [True] * 200
    records = rig.records()
    assert all(p.ifindex in records for p in pods)
    assert elapsed < 30
    assert rig.proc is not None
    assert rig.proc.returncode is None


# ---- the interfaces EKS gives pods --------------------------------------------------
async def test_pod_with_two_network_cards_enforces_on_both(rig: AgentRig) -> None:
    first, allowed, denied = await node_pods(rig)  # running before the CNI calls begin
    cni_node(rig, "standard")
    rig.apply(web_policy(rig, [first], [allowed]))
    await start(rig)
    await rig.settle_agent()
    pod = await cni_pod(rig, "web-multi", WEB, interfaces=2)
    assert len(pod.ifindexes) == 2
    records = rig.records()
    ids = {records[i].pod_id for i in pod.ifindexes}
    assert len(ids) == 1, "both cards carry the pod's programmed record"
    assert ids != {0}, "the record is the pod's, not the default"
    second = pod.extra[0][2]
    assert await tcp_probe(netns=allowed.netns, target=second, port=80, expect="web-multi")
    assert not await tcp_probe(netns=denied.netns, target=second, port=80)
    assert not await rig.probe(denied, pod)


async def test_branch_eni_pod_found_through_its_rule_table(rig: AgentRig) -> None:
    first, allowed, denied = await node_pods(rig)  # running before the CNI calls begin
    cni_node(rig, "strict")
    rig.apply(web_policy(rig, [first], [allowed]))
    await start(rig)
    await rig.settle_agent()
    rig.schedule_pod("web-sg", labels=WEB)
    rig.sim.call_cni = False  # created without the call: found when its veth appears
    pod = await rig.sim.add_pod("web-sg", labels=WEB, branch_table=105)
    rig.sim.call_cni = True
    server = PodServer(name="web-sg", netns=pod.netns)
    await server.start()
    rig.servers["web-sg"] = server
    assert pod.host_veth.startswith("vlan")
    rig.pod_running(pod)
    rig.apply(web_policy(rig, [first, pod], [allowed]))
    await rig.settle_agent()
    records = rig.records()
    assert records[pod.ifindex].pod_id != 0
    # the VLAN link (its name has the vlan prefix) is never taken for a pod interface
    assert pod.vlan_link[1]
    assert pod.vlan_link[1] not in records
    assert await rig.probe(allowed, pod)
    assert not await rig.probe(denied, pod)


# ---- restarts -----------------------------------------------------------------------
async def test_calls_while_the_agent_restarts_fail_cleanly_or_succeed(rig: AgentRig) -> None:
    cni_node(rig, "strict")
    await start(rig)
    outcomes: list[str] = []
    created: list[SimPod] = []

    async def creator() -> None:
        for i in range(12):
            try:
                created.append(await cni_pod(rig, f"r-{i}", {"app": "r"}, serve=False))
                outcomes.append("ok")
            except CniRefusedError:
                outcomes.append("refused")
            await asyncio.sleep(0.15)

    task = asyncio.create_task(creator())
    await asyncio.sleep(0.4)
    assert await rig.stop_agent() == 0
    await asyncio.sleep(0.3)
    await start(rig)
    await asyncio.wait_for(task, 120)
    assert "ok" in outcomes
    records = rig.records()
    # every pod whose call succeeded enforces; a refused pod would be retried by kubelet
    assert all(p.ifindex in records for p in created)
    await rig.settle_agent()


async def test_hostnet_finds_pods_through_rule_tables_and_skips_vlan_links(sim: Any) -> None:
    """The kernel's own view (no agent): a branch-ENI pod is routed only in its VLAN's
    table, which a rule selects; a table no rule selects is not looked at; the VLAN
    link is no pod interface though its name has the ``vlan`` prefix."""
    from agent.hostnet import HostNet
    from common.netlink import Netlink
    from simnode import netns

    sim.cni_socket = "/nonexistent"  # CNI naming
    sim.call_cni = False
    pod = await sim.add_pod("sg", branch_table=105)
    hostnet = HostNet(prefixes=("eni", "vlan"), netns=sim.netns)
    async with Netlink(netns=sim.netns) as nl:
        await hostnet.load(nl)
        assert await hostnet.interfaces_of(nl, str(pod.ipv4)) == {pod.ifindex}
        assert hostnet.routed_interfaces(str(pod.ipv6)) == {pod.ifindex}
        assert hostnet.named_interfaces("default", "sg") == [pod.ifindex]
    vlans = [ln for ln in hostnet.links.values() if ln.name.startswith("vlan.eth.")]
    assert vlans
    assert all(v.index not in hostnet.pod_interfaces() for v in vlans)
    # without the rules, the table is not one the node routes by
    await netns.arun(
        f"ip rule del to {pod.ipv4} lookup 105; ip rule del iif {pod.host_veth} lookup 105;"
        f"ip rule del iif {vlans[0].name} lookup 105",
        netns=sim.netns,
    )
    hostnet = HostNet(prefixes=("eni", "vlan"), netns=sim.netns)
    async with Netlink(netns=sim.netns) as nl:
        await hostnet.load(nl)
    assert hostnet.routed_interfaces(str(pod.ipv4)) == set()
    assert hostnet.routed_interfaces(str(pod.ipv6)) == {pod.ifindex}  # v6 rules remain


# the flags EKS gives the aws-eks-nodeagent container (the VPC CNI chart's daemonset)
REFERENCE_ARGS = (
    "--enable-ipv6=false",
    "--enable-network-policy=true",
    "--enable-cloudwatch-logs=false",
    "--enable-policy-event-logs=false",
    "--log-file=/var/log/aws-routed-eni/network-policy-agent.log",
    "--metrics-bind-addr=:8162",
    "--health-probe-bind-addr=:8163",
    "--conntrack-cache-cleanup-period=300",
    "--log-level=debug",
)


async def test_the_image_entrypoint_takes_the_reference_flags(rig: AgentRig) -> None:
    """/controller with EKS's flags runs the enforcer and the conntrack cleaner, serves
    the CNI, and drains both on SIGTERM."""
    cni_node(rig, "strict")
    proc = await rig.start("controller", *REFERENCE_ARGS)
    await rig.ready()
    pod = await cni_pod(rig, "via-entrypoint", {"app": "x"}, serve=False)
    assert pod.ifindex in rig.records()
    want = {"agent.sock", "conntrack.sock", "npa.sock"}

    async def all_serving() -> bool:
        return want <= set(os.listdir(rig.runtime_dir))

    await eventually(all_serving, timeout=20, what=lambda: str(os.listdir(rig.runtime_dir)))
    assert await rig.stop("controller") == 0
    assert proc.returncode == 0
    assert "npa.sock" not in os.listdir(rig.runtime_dir), "the CNI socket is removed at exit"
    log = rig.log_file("controller").read_text()
    assert '"controller.child_ended"' in log


async def test_an_invalid_flag_stops_the_entrypoint_naming_it(rig: AgentRig) -> None:
    proc = await rig.start("controller", *REFERENCE_ARGS, "--conntrack-cache-table-size=5")
    assert await asyncio.wait_for(proc.wait(), 30) == 2
    assert "--conntrack-cache-table-size" in rig.log_file("controller").read_text()
    rig.procs.pop("controller")


@pytest.mark.parametrize(("ipamd_mode", "expect"), [("strict", "strict"), ("lenient", "standard")])
async def test_the_mode_comes_from_ipamd_when_it_answers(
    rig: AgentRig, ipamd_mode: str, expect: str
) -> None:
    """ipamd's GetNetworkPolicyConfigs, served like ipamd serves it: its mode wins over
    the environment (standard here); an invalid one is logged and the environment's
    kept. Its node address joins the node's."""
    from agent.cni import rpc_pb2 as pb
    from agent.cni.service import config_backend_handler, serving

    reply = pb.NetworkPolicyAgentConfigReply(
        NetworkPolicyMode=ipamd_mode,
        MultiNICEnabled=True,
        NodeIPv4="172.31.9.9",
        InstanceID="i-0123",
        Region="us-west-2",
    )
    ipamd = f"{rig.runtime_dir}/ipamd.sock"
    os.makedirs(rig.runtime_dir, exist_ok=True)
    async with serving(ipamd, [config_backend_handler(lambda: reply)]):
        await start(rig)
    lines = rig.log_lines()
    config = [ln for ln in lines if ln.get("event") == "ipamd.config"]
    assert config, "ipamd was not asked"
    assert config[-1]["multi_nic"] is True
    assert "172.31.9.9" in config[-1]["node_addresses"]
    started = [ln for ln in lines if ln.get("event") == "agent.starting"]
    assert started[-1]["mode"] == expect
    if ipamd_mode == "lenient":
        assert any(ln.get("event") == "ipamd.invalid_mode" for ln in lines)
    # the mode in force: a pod wired without the CNI's call gets its default
    pod = await rig.add_pod("plain", create_object=False)
    await eventually(
        lambda: _has_record(rig, pod.ifindex), timeout=10, what="the new veth attached"
    )
    peer = await rig.add_pod("peer2", create_object=False)
    await eventually(lambda: _has_record(rig, peer.ifindex), timeout=10, what="the peer attached")
    assert await rig.probe(peer, pod) is (expect == "standard")


async def _has_record(rig: AgentRig, ifindex: int) -> bool:
    return ifindex in rig.records()
