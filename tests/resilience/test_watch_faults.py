"""The API server is a peer we do not control: oversized events, garbage lines, wrong
shapes and a stream that always breaks at one event. Over real HTTP against the fake API
server's fault injection: first the list-watch loop itself, then the real agent with
real packets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from common.kube import PODS, KubeClient, WatchEvent
from common.watching import WatchSettings, WatchStats, list_watch
from fakekube import store as fs
from fakekube.server import FakeKube
from tests.privileged.agentrig import AgentRig, allow_from, eventually

FAST = WatchSettings(backoff_initial=0.05, backoff_max=0.2, relist_after=3, stall_after=1.0)


def pod(name: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Running", **status},
    }


class Recorder:
    """A consumer keeping the latest state; raises on objects it cannot take, as a
    careless consumer would (the loop must survive it)."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.lists = 0
        self._new: dict[str, dict[str, Any]] = {}

    def begin(self) -> None:
        self._new = {}

    def add(self, obj: dict[str, Any]) -> None:
        self._new[obj["metadata"]["name"]] = obj
        obj["status"].get("phase")  # a string status raises AttributeError here

    def end(self) -> None:
        self.state, self.lists = self._new, self.lists + 1

    def apply(self, event: WatchEvent) -> None:
        name = event.object["metadata"]["name"]
        event.object["status"].get("phase")
        if event.type == "DELETED":
            self.state.pop(name, None)
        else:
            self.state[name] = event.object


@contextlib.asynccontextmanager
async def watching(
    client: KubeClient, rec: Recorder, stats: WatchStats
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(
        list_watch(client, PODS, rec, stats=stats, settings=FAST), name="test-watch"
    )
    try:
        await asyncio.wait_for(stats.synced.wait(), 5)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check: Any, what: str, timeout: float = 5) -> None:
    async def ok() -> bool:
        return bool(check())

    await eventually(ok, timeout=timeout, what=what)


async def test_garbage_and_wrong_shapes_are_skipped(api: tuple[FakeKube, KubeClient]) -> None:
    server, client = api
    rec, stats = Recorder(), WatchStats()
    async with watching(client, rec, stats) as task:
        await until(lambda: server.inject("pods", b"") >= 1, "a live watch")
        bad = (
            b"this is not json\n",
            b'"a string"\n',
            b'{"type": "ADDED"}\n',
            b'{"type": "ADDED", "object": "x"}\n',
            b'{"type": "ADDED", "object": {"metadata": "x"}}\n',
            json.dumps({"type": "ADDED", "object": pod("str-status") | {"status": "x"}}).encode()
            + b"\n",
        )
        for i, raw in enumerate(bad):
            server.inject("pods", raw)
            server.store.create(fs.PODS, "default", pod(f"after-{i}"))
            await until(lambda i=i: f"after-{i}" in rec.state, f"after-{i}")
        assert sorted(rec.state) == [f"after-{i}" for i in range(len(bad))]
        assert not task.done()
        assert stats.malformed == 5
        assert stats.rejected == 1  # the consumer could not take the string status


async def test_an_oversized_event_is_skipped_then_listed(api: tuple[FakeKube, KubeClient]) -> None:
    server, client = api
    rec, stats = Recorder(), WatchStats()
    async with watching(client, rec, stats) as task:
        await until(lambda: server.inject("pods", b"") >= 1, "a live watch")

        # a 5 MiB event (aiohttp's line limit crashed the agent on it) is taken
        def big(name: str, mib: int) -> bytes:
            obj = pod(name) | {
                "metadata": {
                    "name": name,
                    "namespace": "default",
                    "annotations": {"x": "y" * (mib * 2**20)},
                }
            }
            return json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n"

        server.inject("pods", big("big", 5))
        await until(lambda: "big" in rec.state, "the 5 MiB event")
        lists = rec.lists
        # one over the bound (MAX_EVENT_BYTES, 8 MiB) is neither held nor fatal: skipped,
        # and the loop lists again (the object it carried is learned from the list)
        server.inject("pods", big("huge", 9))
        server.store.create(fs.PODS, "default", pod("listed"))
        await until(lambda: rec.lists > lists and "listed" in rec.state, "a re-list")
        assert "huge" not in rec.state
        assert stats.malformed == 1
        assert stats.relists == 1
        server.store.create(fs.PODS, "default", pod("later"))
        await until(lambda: "later" in rec.state, "changes after the re-list")
        assert not task.done()


async def test_a_stream_that_breaks_at_one_event_relists(api: tuple[FakeKube, KubeClient]) -> None:
    server, client = api
    rec, stats = Recorder(), WatchStats()
    async with watching(client, rec, stats):
        lists = rec.lists
        server.cut_watches_at("pods", lambda o: o["metadata"]["name"] == "poison")
        server.store.create(fs.PODS, "default", pod("poison"))
        server.store.create(fs.PODS, "default", pod("after"))
        # every watch from the version before "poison" breaks in the middle of it; after
        # 3 failures in a row the loop lists (which does not stream events) and goes on
        await until(lambda: rec.lists > lists and "after" in rec.state, "a re-list", 10)
        assert "poison" in rec.state
        assert stats.errors >= FAST.relist_after
        assert stats.relists >= 1
        server.cut_watches_at("pods", None)
        server.store.create(fs.PODS, "default", pod("later"))
        await until(lambda: "later" in rec.state, "changes after the re-list")
        assert stats.stalled(FAST.stall_after) == 0


async def test_a_watch_failing_without_progress_is_reported(
    api: tuple[FakeKube, KubeClient],
) -> None:
    server, client = api
    rec, stats = Recorder(), WatchStats()
    async with watching(client, rec, stats):
        assert stats.stalled(FAST.stall_after) == 0
        await asyncio.sleep(FAST.stall_after + 0.2)
        assert stats.stalled(FAST.stall_after) == 0  # quiet is not stalled
        await server.pause()
        await until(
            lambda: stats.stalled(FAST.stall_after) > FAST.stall_after, "reported stalled", 5
        )
        await server.resume()
        await until(lambda: stats.stalled(FAST.stall_after) == 0, "progress again", 10)


# ---- the real agent ----------------------------------------------------------------------


async def test_the_agent_survives_a_hostile_api_server(rig: AgentRig) -> None:
    web, ok, other = (await rig.add_pod("web"), await rig.add_pod("ok"), await rig.add_pod("other"))
    await rig.start_agent()
    await rig.ready()
    cases = [(ok, web, 80, "TCP", 4), (other, web, 80, "TCP", 4)]
    rig.apply(rig.policy_endpoint("allow-ok", targets=[web], ingress=allow_from(ok)))
    await rig.converge(cases, [True, False])

    async def streams() -> bool:
        return rig.api.inject("policyendpoints", b"") >= 1 and rig.api.inject("pods", b"") >= 1

    await eventually(streams, timeout=10, what="the agent's watches")
    # garbage, wrong shapes and a 9 MiB event on the PolicyEndpoint watch
    rig.api.inject("policyendpoints", b"{{{ not json\n")
    rig.api.inject("policyendpoints", b'{"type": "MODIFIED", "object": "allow-ok"}\n')
    huge = rig.policy_endpoint("huge", targets=[web], ingress=allow_from(other))
    huge["metadata"]["annotations"] = {"pad": "x" * (9 * 2**20)}
    rig.api.inject(
        "policyendpoints", json.dumps({"type": "ADDED", "object": huge}).encode() + b"\n"
    )
    # a Pod whose podIPs have the wrong shape, on the pod watch and in the store (so
    # every re-list meets it too)
    bad = rig.create_pod_object(other, name="bad-ips")
    bad_update = dict(bad, status=dict(bad["status"], podIPs=["x"]))
    rig.api.store.update(fs.PODS, "default", "bad-ips", bad_update)
    # the agent is alive and applies what comes after
    rig.apply(rig.policy_endpoint("allow-ok", targets=[web], ingress=allow_from(ok, other)))
    await rig.converge(cases, [True, True])
    assert rig.proc is not None
    assert rig.proc.returncode is None
    events = {ln.get("event") for ln in rig.log_lines()}
    assert {"watch.malformed_event", "watch.relisting", "pod.rejected"} <= events, events
    assert "supervisor.task_failed" not in events
    _, metrics = await rig.http(8162, "/metrics")
    assert (
        "awsnodeagent_pod_objects_rejected_total 1.0" in metrics
        or "awsnodeagent_pod_objects_rejected_total 2.0" in metrics
    ), metrics[-2000:]
    # the log lines about them are short
    longest = max(len(line) for line in rig.log_path.read_text().splitlines())
    assert longest < 4096, longest
    assert (await rig.http(8163, "/readyz"))[0] == 200
