"""The resolver: NetworkPolicy -> PolicyEndpoint contents, and the writes that keep them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from common.kube import (
    NAMESPACES,
    NETWORK_POLICIES,
    PODS,
    POLICY_ENDPOINTS,
    SERVICES,
    KubeClient,
    Resource,
)
from common.watching import list_watch
from fakekube import store as fs
from fakekube.server import FakeKube
from resolver.resolve import World, pod_from, resolve, service_from
from resolver.sync import Resolver


def pod(
    ns: str,
    name: str,
    ips: list[str],
    labels: dict[str, str] | None = None,
    *,
    phase: str = "Running",
    ports: list[tuple[str, int]] | None = None,
    host_network: bool = False,
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name, "labels": labels or {}},
        "spec": {
            "nodeName": "n1",
            "hostNetwork": host_network,
            "containers": [
                {
                    "name": "c",
                    "ports": [
                        {"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports or []
                    ],
                }
            ],
        },
        "status": {
            "phase": phase,
            "hostIP": "172.31.0.1",
            "podIPs": [{"ip": ip} for ip in ips],
            "podIP": ips[0] if ips else "",
        },
    }


def world(
    *pods: dict[str, Any],
    namespaces: dict[str, dict[str, str]] | None = None,
    services: list[dict[str, Any]] | None = None,
) -> World:
    w = World()
    for p in pods:
        parsed = pod_from(p)
        w.pods[(parsed.namespace, parsed.name)] = parsed
    for ns, labels in (namespaces or {"x": {}, "y": {}}).items():
        w.namespaces[ns] = {"kubernetes.io/metadata.name": ns, **labels}
    for s in services or []:
        svc = service_from(s)
        w.services[(svc.namespace, svc.name)] = svc
    return w


def np(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"}, "spec": spec}


W = world(
    pod("x", "a", ["10.0.0.1", "fd00::1"], {"app": "a"}, ports=[("web", 8080)]),
    pod("x", "b", ["10.0.0.2"], {"app": "b"}, ports=[("web", 9090)]),
    pod("y", "c", ["10.0.1.3"], {"app": "a"}, ports=[("web", 8080)]),
    pod("y", "done", ["10.0.1.4"], {"app": "a"}, phase="Succeeded"),
    pod("y", "nohost", ["172.31.0.1"], {"app": "a"}, host_network=True),
)


def cidrs(entries: list[dict[str, Any]]) -> list[str]:
    return sorted(e["cidr"] for e in entries)


def test_pod_selector_peers_are_bare_ips_of_ready_pods_in_both_families() -> None:
    (spec,) = resolve(
        np(
            "p",
            "x",
            {
                "podSelector": {"matchLabels": {"app": "b"}},
                "ingress": [{"from": [{"podSelector": {}}]}],
            },
        ),
        W,
    )
    assert spec["podIsolation"] == ["Ingress"]
    assert [e["name"] for e in spec["podSelectorEndpoints"]] == ["b"]
    assert cidrs(spec["ingress"]) == ["10.0.0.1", "10.0.0.2", "fd00::1"]
    assert all("ports" not in e for e in spec["ingress"])


def test_namespace_selectors() -> None:
    (spec,) = resolve(
        np(
            "p",
            "x",
            {
                "podSelector": {},
                "ingress": [
                    {
                        "from": [
                            {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}
                        ]
                    }
                ],
            },
        ),
        W,
    )
    assert cidrs(spec["ingress"]) == ["10.0.0.1", "10.0.1.3", "fd00::1"], (
        "Succeeded and hostNetwork pods are not peers"
    )
    (spec,) = resolve(
        np(
            "p",
            "x",
            {
                "podSelector": {},
                "ingress": [
                    {
                        "from": [
                            {
                                "namespaceSelector": {
                                    "matchExpressions": [
                                        {
                                            "key": "kubernetes.io/metadata.name",
                                            "operator": "NotIn",
                                            "values": ["x"],
                                        }
                                    ]
                                }
                            }
                        ]
                    }
                ],
            },
        ),
        W,
    )
    assert cidrs(spec["ingress"]) == ["10.0.1.3"]


def test_empty_from_allows_all_and_ipblock_keeps_except() -> None:
    (spec,) = resolve(
        np(
            "p",
            "x",
            {
                "podSelector": {},
                "ingress": [
                    {},
                    {
                        "from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                        "ports": [{"port": 80, "endPort": 90}],
                    },
                ],
            },
        ),
        W,
    )
    assert {e["cidr"]: e for e in spec["ingress"]}["10.0.0.0/8"] == {
        "cidr": "10.0.0.0/8",
        "except": ["10.1.0.0/16"],
        "ports": [{"protocol": "TCP", "port": 80, "endPort": 90}],
    }
    assert {"0.0.0.0/0", "::/0"} <= set(cidrs(spec["ingress"]))


def test_policy_types_defaulting() -> None:
    (spec,) = resolve(np("p", "x", {"podSelector": {}, "egress": [{}]}), W)
    assert spec["podIsolation"] == ["Ingress", "Egress"]
    assert spec["ingress"] == []
    assert cidrs(spec["egress"]) == ["0.0.0.0/0", "::/0"]
    (spec,) = resolve(np("p", "x", {"podSelector": {}, "policyTypes": ["Egress"]}), W)
    assert spec["podIsolation"] == ["Egress"]


def test_ingress_named_ports_split_targets_that_resolve_differently() -> None:
    specs = resolve(
        np(
            "p",
            "x",
            {
                "podSelector": {},
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                        "ports": [{"port": "web"}],
                    }
                ],
            },
        ),
        W,
    )
    by_target = {tuple(e["name"] for e in s["podSelectorEndpoints"]): s for s in specs}
    assert set(by_target) == {("a",), ("b",)}
    assert by_target[("a",)]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert by_target[("b",)]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9090}]


def test_unresolvable_named_port_allows_nothing() -> None:
    (spec,) = resolve(
        np(
            "p",
            "x",
            {
                "podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{"ports": [{"port": "metrics"}]}],
            },
        ),
        W,
    )
    assert spec["ingress"] == [], "not 'every port'"
    assert spec["podIsolation"] == ["Ingress"]


def test_egress_named_ports_without_to_resolve_per_destination() -> None:
    (spec,) = resolve(
        np(
            "p",
            "x",
            {
                "podSelector": {"matchLabels": {"app": "a"}},
                "policyTypes": ["Egress"],
                "egress": [{"ports": [{"port": "web"}]}],
            },
        ),
        W,
    )
    got = {e["cidr"]: e["ports"][0]["port"] for e in spec["egress"]}
    assert got == {"10.0.0.1": 8080, "fd00::1": 8080, "10.0.0.2": 9090, "10.0.1.3": 8080}


def test_egress_selector_peers_add_service_cluster_ips() -> None:
    svc = {
        "metadata": {"namespace": "y", "name": "web"},
        "spec": {
            "clusterIP": "10.96.0.10",
            "selector": {"app": "a"},
            "ports": [
                {"port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"port": 443, "targetPort": 8443, "protocol": "TCP"},
            ],
        },
    }
    w = world(*[pod("y", "c", ["10.0.1.3"], {"app": "a"}, ports=[("web", 8080)])], services=[svc])
    (spec,) = resolve(
        np(
            "p",
            "y",
            {
                "podSelector": {},
                "policyTypes": ["Egress"],
                "egress": [
                    {
                        "to": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                        "ports": [{"port": 8080}],
                    }
                ],
            },
        ),
        w,
    )
    got = {e["cidr"]: e.get("ports") for e in spec["egress"]}
    assert got == {
        "10.0.1.3": [{"protocol": "TCP", "port": 8080}],
        "10.96.0.10": [{"protocol": "TCP", "port": 80}],
    }


def test_chunks_pair_every_pod_with_every_rule() -> None:
    pods = [pod("x", f"t{i}", [f"10.1.{i // 250}.{i % 250}"], {"t": "1"}) for i in range(250)]
    peers = [{"ipBlock": {"cidr": f"192.168.{i // 250}.{i % 250}/32"}} for i in range(450)]
    specs = resolve(
        np("p", "x", {"podSelector": {"matchLabels": {"t": "1"}}, "ingress": [{"from": peers}]}),
        world(*pods),
    )
    assert len(specs) == 2 * 3
    assert all(len(s["podSelectorEndpoints"]) <= 200 and len(s["ingress"]) <= 200 for s in specs)
    seen: dict[str, set[str]] = {}
    for s in specs:
        for e in s["podSelectorEndpoints"]:
            seen.setdefault(e["name"], set()).update(x["cidr"] for x in s["ingress"])
    assert len(seen) == 250
    assert all(len(v) == 450 for v in seen.values())


# ---- the writes, against the fake API server --------------------------------------------
@contextlib.asynccontextmanager
async def resolver_on_fake_api(
    tmp_path: Path, watches: dict[str, Resource], **options: Any
) -> AsyncIterator[tuple[FakeKube, Resolver]]:
    """A resolver fed by ``watches`` (consumer name -> resource) from a fake API server."""
    server = FakeKube(bookmark_interval=0.2)
    await server.start()
    server.write_kubeconfig(str(tmp_path / "kubeconfig"))
    kube = await KubeClient.connect(str(tmp_path / "kubeconfig"))
    resolver = Resolver(kube, debounce=0.01, **options)
    tasks = [
        asyncio.create_task(list_watch(kube, r, resolver.consumer(n)), name=n)
        for n, r in watches.items()
    ]
    tasks.append(asyncio.create_task(resolver.run(), name="resolve"))
    try:
        yield server, resolver
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await kube.close()
        await server.stop()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[FakeKube, Resolver]]:
    async with resolver_on_fake_api(
        tmp_path,
        {
            "networkpolicies": NETWORK_POLICIES,
            "pods": PODS,
            "namespaces": NAMESPACES,
            "services": SERVICES,
            "policyendpoints": POLICY_ENDPOINTS,
        },
    ) as running:
        yield running


async def settled(server: FakeKube, resolver: Resolver) -> None:
    target = server.store.rv
    for _ in range(200):
        if resolver.idle.is_set() and resolver.stats.observed_rv >= target:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("resolver did not settle")


async def test_resolver_writes_updates_in_place_and_cleans_up(
    cluster: tuple[FakeKube, Resolver],
) -> None:
    server, resolver = cluster
    st = server.store
    for ns in ("x", "y"):
        st.create(fs.NAMESPACES, None, {"metadata": {"name": ns}})
    st.create(fs.PODS, "x", pod("x", "a", ["10.0.0.1"], {"app": "a"}))
    st.create(fs.PODS, "x", pod("x", "b", ["10.0.0.2"], {"app": "b"}))
    policy = st.create(
        fs.NETWORK_POLICIES,
        "x",
        {
            "metadata": {"name": "allow-b"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}],
            },
        },
    )
    await settled(server, resolver)
    (pe,) = st.list(fs.POLICY_ENDPOINTS)[0]
    meta = pe["metadata"]
    assert meta["name"].startswith("allow-b-")
    assert meta["ownerReferences"][0]["uid"] == policy["metadata"]["uid"]
    assert meta["ownerReferences"][0]["controller"] is True
    assert "networking.k8s.aws/last-change-trigger-time" in meta["annotations"]
    assert pe["spec"]["ingress"] == [{"cidr": "10.0.0.2"}]
    writes = resolver.stats.writes

    # a label change elsewhere that changes nothing: no write
    st.patch(fs.PODS, "x", "a", {"metadata": {"labels": {"app": "a", "tier": "web"}}})
    await settled(server, resolver)
    assert resolver.stats.writes == writes

    # a change that matters: the same object is updated in place
    st.patch(fs.PODS, "x", "a", {"metadata": {"labels": {"app": "b"}}})
    await settled(server, resolver)
    (after,) = st.list(fs.POLICY_ENDPOINTS)[0]
    assert after["metadata"]["uid"] == meta["uid"]
    assert after["metadata"]["generation"] == meta["generation"] + 1
    assert after["spec"]["podSelectorEndpoints"] == []
    assert {e["cidr"] for e in after["spec"]["ingress"]} == {"10.0.0.1", "10.0.0.2"}

    st.delete(fs.NETWORK_POLICIES, "x", "allow-b")
    await settled(server, resolver)
    assert st.list(fs.POLICY_ENDPOINTS)[0] == []
