"""The fake API server speaks the protocol the agent relies on, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from common.kube import (
    NAMESPACES,
    NETWORK_POLICIES,
    PODS,
    POLICY_ENDPOINTS,
    GoneError,
    KubeClient,
    KubeError,
    Resource,
    WatchEvent,
)
from common.watching import Replacing, WatchSettings, WatchStats, list_into, list_watch
from fakekube import store as fs
from fakekube.selectors import SelectorError, field_selector, label_selector
from fakekube.server import FakeKube


def pod(
    name: str, *, ns: str = "default", node: str = "n1", labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": node},
        "status": {"phase": "Running"},
    }


@pytest.mark.parametrize(
    ("selector", "labels", "expect"),
    [
        pytest.param("a=b", {"a": "b"}, True, id="equality"),
        pytest.param("a==b,c!=d", {"a": "b", "c": "e"}, True, id="double equals and inequality"),
        pytest.param("a!=b", {}, True, id="inequality matches a missing key"),
        pytest.param("a in (x, y)", {"a": "y"}, True, id="in"),
        pytest.param("a notin (x)", {"a": "x"}, False, id="notin"),
        pytest.param("a,!b", {"a": "1"}, True, id="exists and does not exist"),
        pytest.param("!a", {"a": "1"}, False, id="does not exist fails"),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expect: bool) -> None:
    assert label_selector(selector)(labels) is expect


def test_field_selectors_and_errors() -> None:
    obj = pod("a", node="n1")
    assert field_selector("spec.nodeName=n1,metadata.name=a")(obj)
    assert not field_selector("spec.nodeName!=n1")(obj)
    with pytest.raises(SelectorError):
        label_selector("a in b")


async def test_crud_and_selectors(api: tuple[FakeKube, KubeClient]) -> None:
    _, client = api
    await client.create(PODS, "default", pod("a", node="n1", labels={"app": "x"}))
    await client.create(PODS, "default", pod("b", node="n2", labels={"app": "y"}))
    items, rv = await client.list(PODS, field_selector="spec.nodeName=n1")
    assert [i["metadata"]["name"] for i in items] == ["a"]
    items, _ = await client.list(PODS, label_selector="app in (x,y)")
    assert len(items) == 2
    created = await client.create(
        POLICY_ENDPOINTS,
        "default",
        {"metadata": {"generateName": "web-"}, "spec": {"policyRef": {"name": "web"}}},
    )
    name = created["metadata"]["name"]
    assert name.startswith("web-")
    assert created["metadata"]["generation"] == 1
    updated = await client.patch(
        POLICY_ENDPOINTS, "default", name, {"spec": {"podIsolation": ["Ingress"]}}
    )
    assert updated["metadata"]["generation"] == 2
    stale = dict(created)
    with pytest.raises(KubeError) as conflict:
        await client.replace(POLICY_ENDPOINTS, "default", name, stale)
    assert conflict.value.status == 409
    ns = await client.create(NAMESPACES, None, {"metadata": {"name": "team"}})
    assert ns["metadata"]["labels"]["kubernetes.io/metadata.name"] == "team"
    # metadata-only lists: names and generations, never the specs
    meta, _ = await client.list_metadata(POLICY_ENDPOINTS, namespace="default")
    assert [m["metadata"]["name"] for m in meta] == [name]
    assert meta[0]["metadata"]["generation"] == 2
    assert meta[0]["kind"] == "PartialObjectMetadata"
    assert "spec" not in meta[0]
    # NetworkPolicies are defaulted as the real API server does
    np_ = await client.create(
        NETWORK_POLICIES,
        "default",
        {"metadata": {"name": "p"}, "spec": {"egress": [{"ports": [{"port": 53}]}]}},
    )
    assert np_["spec"]["podSelector"] == {}
    assert np_["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert np_["spec"]["egress"][0]["ports"][0]["protocol"] == "TCP"
    await client.delete(PODS, "default", "a")
    with pytest.raises(KubeError) as missing:
        await client.get(PODS, "default", "a")
    assert missing.value.status == 404
    assert int(rv) < int(updated["metadata"]["resourceVersion"])


async def test_watch_replays_from_version_and_filters(api: tuple[FakeKube, KubeClient]) -> None:
    _, client = api
    _, rv = await client.list(PODS)
    await client.create(PODS, "default", pod("a", node="n1"))
    await client.create(PODS, "default", pod("b", node="n2"))
    await client.patch(PODS, "default", "a", {"spec": {"nodeName": "n2"}})  # leaves n1
    seen: list[tuple[str, str]] = []
    async for ev in client.watch(
        PODS, resource_version=rv, field_selector="spec.nodeName=n1", timeout_seconds=1
    ):
        if ev.type != "BOOKMARK":
            seen.append((ev.type, ev.object["metadata"]["name"]))
    assert seen == [("ADDED", "a"), ("DELETED", "a")]


async def test_watch_bookmarks_and_410(api: tuple[FakeKube, KubeClient]) -> None:
    server, client = api
    _, rv = await client.list(PODS)
    types = [ev.type async for ev in client.watch(PODS, resource_version=rv, timeout_seconds=1)]
    assert "BOOKMARK" in types
    await client.create(PODS, "default", pod("a"))
    server.compact()
    with pytest.raises(GoneError):
        async for _ in client.watch(PODS, resource_version=rv, timeout_seconds=1):
            pass


class Recorder(Replacing):
    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.replaced = 0

    def replace(self, items: list[dict[str, Any]]) -> None:
        self.replaced += 1
        self.state = {i["metadata"]["name"]: i for i in items}

    def apply(self, event: WatchEvent) -> None:
        name = event.object["metadata"]["name"]
        if event.type == "DELETED":
            self.state.pop(name, None)
        else:
            self.state[name] = event.object


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_list_watch_survives_410_drops_and_outages(api: tuple[FakeKube, KubeClient]) -> None:
    server, client = api
    rec, stats = Recorder(), WatchStats()
    settings = WatchSettings(backoff_initial=0.05, backoff_max=0.2, idle_timeout=2)
    task = asyncio.create_task(
        list_watch(
            client, PODS, rec, field_selector="spec.nodeName=n1", settings=settings, stats=stats
        ),
        name="watch",
    )
    try:
        await client.create(PODS, "default", pod("a"))
        await wait_for(lambda: "a" in rec.state)
        assert stats.synced.is_set()

        # 410: missed changes are recovered by a re-list, removals included
        await server.drop_watches()
        server.compact()
        server.store.delete(fs.PODS, "default", "a")
        server.store.create(fs.PODS, "default", pod("b"))
        server.compact()
        await wait_for(lambda: set(rec.state) == {"b"})
        assert stats.gone >= 1
        assert rec.replaced >= 2

        # a dropped connection resumes from the last version, without a re-list
        lists = stats.lists
        await server.drop_watches()
        server.store.create(fs.PODS, "default", pod("c"))
        await wait_for(lambda: "c" in rec.state)
        assert stats.lists == lists

        # an outage: connections refused for a while, then back
        await server.pause()
        server.store.create(fs.PODS, "default", pod("d"))
        await asyncio.sleep(0.5)
        assert "d" not in rec.state
        await server.resume()
        await wait_for(lambda: "d" in rec.state)
        assert stats.errors >= 1
        assert not task.done()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_paginated_lists_and_paged_list_watch(api: tuple[FakeKube, KubeClient]) -> None:
    server, client = api
    for i in range(25):
        server.store.create(fs.PODS, "default", pod(f"p{i:02d}"))
    names, token, versions = [], "", set()
    while True:
        items, rv, token = await client.list_page(PODS, limit=10, continue_token=token)
        assert len(items) <= 10
        names += [i["metadata"]["name"] for i in items]
        versions.add(rv)
        server.store.create(fs.PODS, "other", pod(f"late{len(names)}", ns="other"))
        if not token:
            break
    assert names[:25] == [f"p{i:02d}" for i in range(25)]
    assert len(versions) == 1, "every page reports the first page's version"
    # an expired continue token is a 410: list again
    _, _, token = await client.list_page(PODS, limit=10)
    server.compact()
    server.store.create(fs.PODS, "default", pod("z"))
    server.compact()
    with pytest.raises(GoneError):
        await client.list_page(PODS, limit=10, continue_token=token)
    # list_watch takes the state page by page, then watches from the list's version
    rec = Recorder()
    task = asyncio.create_task(
        list_watch(client, PODS, rec, settings=WatchSettings(page_size=7)), name="watch"
    )
    try:
        await wait_for(lambda: rec.replaced == 1)
        assert len(rec.state) == len(server.store.objects[fs.PODS])
        server.store.create(fs.PODS, "default", pod("after"))
        await wait_for(lambda: "after" in rec.state)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert server.requests["list pods"] >= 5


class _Ordered(Recorder):
    """Records when each object reaches it, beside the page requests; fails at ``fail_at``."""

    def __init__(self, events: list[str], fail_at: str = "") -> None:
        super().__init__()
        self.events, self.fail_at = events, fail_at

    def add(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if name == self.fail_at:
            raise RuntimeError("consumer broke")
        self.events.append("add")
        super().add(obj)


def _asks_recorded(client: KubeClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Events, beginning with an "ask" for every list page the client requests."""
    events: list[str] = []
    real = client.list_page

    async def list_page(resource: Resource, **kw: Any) -> tuple[list[Any], str, str]:
        events.append("ask")
        return await real(resource, **kw)

    monkeypatch.setattr(client, "list_page", list_page)
    return events


async def test_a_list_asks_for_the_next_page_before_parsing_this_one(
    api: tuple[FakeKube, KubeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, client = api
    for i in range(10):
        server.store.create(fs.PODS, "default", pod(f"p{i}"))
    events = _asks_recorded(client, monkeypatch)
    pods = len(server.store.objects[fs.PODS])
    rec = _Ordered(events)
    version, count = await list_into(client, PODS, rec, settings=WatchSettings(page_size=4))
    assert count == pods == len(rec.state)
    assert version
    # the request for page n+1 is out before page n's first object reaches the consumer
    sizes = [min(4, pods - i) for i in range(0, pods, 4)]
    expected = ["ask"]
    for k, size in enumerate(sizes):
        expected += ["ask"] * (k + 1 < len(sizes)) + ["add"] * size
    assert events == expected

    # a consumer that breaks mid-list: the error surfaces and no page request is left behind
    events.clear()
    broken = _Ordered(events, fail_at=list(rec.state)[1])
    with pytest.raises(RuntimeError, match="consumer broke"):
        await list_into(client, PODS, broken, settings=WatchSettings(page_size=2))
    assert events[:2] == ["ask", "ask"]
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("list-page:")]


async def test_a_list_fetches_while_its_consumer_waits_for_what_it_needs(
    api: tuple[FakeKube, KubeClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ready``: the first two page requests go out before the gate opens; the consumer
    sees nothing (not even begin) until it does, then the whole list in order."""
    server, client = api
    for i in range(10):
        server.store.create(fs.PODS, "default", pod(f"q{i}"))
    events = _asks_recorded(client, monkeypatch)
    gate = asyncio.Event()

    async def ready() -> None:
        events.append("waiting")
        await gate.wait()
        events.append("ready")

    class Gated(_Ordered):
        def begin(self) -> None:
            events.append("begin")
            super().begin()

    rec = Gated(events)
    task = asyncio.create_task(
        list_into(client, PODS, rec, settings=WatchSettings(page_size=4), ready=ready),
        name="gated-list",
    )
    await wait_for(lambda: "waiting" in events or task.done())
    await asyncio.sleep(0.2)  # the gate stays shut: nothing reaches the consumer
    assert events == ["ask", "ask", "waiting"]
    gate.set()
    version, count = await task
    pods = len(server.store.objects[fs.PODS])
    assert count == pods == len(rec.state)
    assert version
    assert events[:5] == ["ask", "ask", "waiting", "ready", "begin"]
    assert events.count("add") == pods
