"""The real kubectl against the fake API server (with admission, as the sandbox runs it):
discovery, tables, every write verb, validation errors and watches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from fakekube import store as fs
from fakekube.server import FakeKube
from tests.kubectl import Run, kubectl, kubectl_path

WALKTHROUGH = Path(__file__).resolve().parents[2] / "examples" / "walkthrough"


def netpol(name: str, port: int, *, extra: str = "") -> str:
    return f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: 10.0.0.0/8}}}}]
    ports: [{{port: {port}}}]
{extra}"""


class Api:
    def __init__(self, kube: FakeKube, kubeconfig: str) -> None:
        self.kube = kube
        self.kubeconfig = kubeconfig

    async def __call__(self, *args: str, stdin: str | None = None) -> Run:
        return await kubectl(self.kubeconfig, *args, stdin=stdin)

    async def ok(self, *args: str, stdin: str | None = None) -> str:
        run = await self(*args, stdin=stdin)
        assert run.rc == 0, f"kubectl {' '.join(args)}: {run.err}"
        return run.out

    def get(self, resource: fs.Resource, namespace: str, name: str) -> dict[str, object]:
        return self.kube.store.get(resource, namespace, name)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    kube = FakeKube(admission=True)
    await kube.start()
    for ns in ("default", "kube-system"):
        kube.store.create(fs.NAMESPACES, None, {"metadata": {"name": ns}})
    kube.write_kubeconfig(str(tmp_path / "kubeconfig"))
    try:
        yield Api(kube, str(tmp_path / "kubeconfig"))
    finally:
        await kube.stop()


def test_kubectl_is_installed() -> None:
    assert Path(kubectl_path()).exists()


async def test_discovery_names_every_resource_served(api: Api) -> None:
    out = await api.ok("api-resources", "--no-headers")
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert listed == {r.plural for r in fs.RESOURCES}
    assert "netpol" in out
    assert "cnp" in out
    # short names resolve
    assert "No resources found" in (await api("get", "netpol")).err


async def test_walkthrough_applies_then_is_unchanged(api: Api) -> None:
    """`kubectl apply -f examples/walkthrough/`: every kind in the files is served (the
    Deployments and Service included), and a second apply changes nothing."""
    out = await api.ok("apply", "-f", str(WALKTHROUGH))
    assert "namespace/another-ns created" in out
    assert "networkpolicy.networking.k8s.io/demo-app-deny-all created" in out
    again = await api.ok("apply", "-f", str(WALKTHROUGH))
    assert "created" not in again
    assert "configured" not in again
    assert again.count("unchanged") == len(again.strip().splitlines())
    policies = api.kube.store.list(fs.NETWORK_POLICIES)[0]
    files = [d for f in WALKTHROUGH.glob("0*.yaml") for d in yaml.safe_load_all(f.read_text())]
    want = {d["metadata"]["name"] for d in files if d and d["kind"] == "NetworkPolicy"}
    assert {p["metadata"]["name"] for p in policies} == want


async def test_get_prints_the_servers_table(api: Api) -> None:
    await api.ok("apply", "-f", "-", stdin=netpol("web", 80))
    out = await api.ok("get", "networkpolicies")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "POD-SELECTOR", "AGE"]
    assert row.split()[:2] == ["web", "app=web"]
    api.kube.store.create(
        fs.PODS,
        "default",
        {
            "metadata": {"name": "p", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "10.1.2.3"},
        },
    )
    wide = (await api.ok("get", "pods", "-o", "wide")).splitlines()
    assert wide[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert wide[1].split()[:3] == ["p", "1/1", "Running"]
    assert wide[1].split()[-2:] == ["10.1.2.3", "n1"]
    assert "p" in await api.ok("get", "pods", "-l", "app=web", "-o", "name")
    assert not (await api.ok("get", "pods", "-l", "app=db", "-o", "name")).strip()


async def test_every_write_verb(api: Api) -> None:
    """create, apply (client-side, then server-side: a field no longer applied is
    removed), replace, label, describe, delete; dry runs change nothing."""
    assert "created" in await api.ok("create", "-f", "-", stdin=netpol("web", 80))
    assert (await api("create", "-f", "-", stdin=netpol("web", 80))).rc == 1  # exists
    assert "configured" in await api.ok("apply", "-f", "-", stdin=netpol("web", 8080))
    spec = api.get(fs.NETWORK_POLICIES, "default", "web")["spec"]
    assert spec["ingress"][0]["ports"] == [{"port": 8080, "protocol": "TCP"}]  # type: ignore[index]

    await api.ok(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "-",
        stdin=netpol("web", 9090, extra="  egress: [{}]\n"),
    )
    spec = api.get(fs.NETWORK_POLICIES, "default", "web")["spec"]
    assert "egress" in spec  # type: ignore[operator]
    await api.ok(
        "apply", "--server-side", "--force-conflicts", "-f", "-", stdin=netpol("web", 9090)
    )
    spec = api.get(fs.NETWORK_POLICIES, "default", "web")["spec"]
    assert "egress" not in spec  # type: ignore[operator]

    assert "replaced" in await api.ok("replace", "-f", "-", stdin=netpol("web", 443))
    assert "labeled" in await api.ok("label", "networkpolicy", "web", "team=blue")
    described = await api.ok("describe", "networkpolicy", "web")
    assert "team=blue" in described
    assert "To Port: 443/TCP" in described
    assert "CIDR: 10.0.0.0/8" in described

    before = api.get(fs.NETWORK_POLICIES, "default", "web")
    await api.ok("apply", "--dry-run=server", "-f", "-", stdin=netpol("web", 1))
    await api.ok("create", "--dry-run=server", "-f", "-", stdin=netpol("other", 1))
    assert api.get(fs.NETWORK_POLICIES, "default", "web") == before
    assert (await api("get", "networkpolicy", "other")).rc == 1

    assert "deleted" in await api.ok("delete", "networkpolicy", "web")
    gone = await api("get", "networkpolicy", "web")
    assert gone.rc == 1
    assert 'networkpolicies.networking.k8s.io "web" not found' in gone.err


async def test_namespaces_from_the_built_in_generator(api: Api) -> None:
    """`kubectl create namespace` writes protobuf; labels go by patch."""
    await api.ok("create", "namespace", "team-a")
    await api.ok("label", "namespace", "team-a", "tier=web")
    labels = api.get(fs.NAMESPACES, "", "team-a")["metadata"]["labels"]  # type: ignore[index]
    assert labels == {"kubernetes.io/metadata.name": "team-a", "tier": "web"}
    refused = await api("create", "deployment", "x", "--image=nginx")
    assert refused.rc == 1
    assert "kubectl create -f" in refused.err


@pytest.mark.parametrize(
    ("body", "printed"),
    [
        (
            netpol("bad", 80).replace("10.0.0.0/8", "10.0.0/8"),
            'The NetworkPolicy "bad" is invalid: spec.ingress[0].from[0].ipBlock.cidr',
        ),
        (
            netpol("bad", 80).replace("port: 80", "port: 70000"),
            'The NetworkPolicy "bad" is invalid',
        ),
        (netpol("bad", 80, extra="  podselector: {}\n"), 'unknown field "spec.podselector"'),
        (netpol("Bad", 80), 'The NetworkPolicy "Bad" is invalid: metadata.name'),
        (
            netpol("bad", 80).replace("namespace: default", "namespace: nowhere"),
            'namespaces "nowhere" not found',
        ),
        (
            "apiVersion: networking.k8s.aws/v1alpha1\nkind: ClusterNetworkPolicy\n"
            "metadata: {name: bad}\n"
            "spec: {tier: Admin, priority: 5000, subject: {namespaces: {}}}\n",
            'The ClusterNetworkPolicy "bad" is invalid: spec.priority',
        ),
    ],
    ids=["cidr", "port", "unknown-field", "name", "namespace", "cluster-priority"],
)
async def test_invalid_objects_come_back_as_status_errors(
    api: Api, body: str, printed: str
) -> None:
    for verb in (
        ("apply", "-f", "-"),
        ("create", "-f", "-"),
        ("apply", "--server-side", "-f", "-"),
    ):
        run = await api(*verb, stdin=body)
        assert run.rc == 1, verb
        assert printed in run.err, (verb, run.err)
    assert not api.kube.store.list(fs.NETWORK_POLICIES)[0]
    assert not api.kube.store.list(fs.CLUSTER_NETWORK_POLICIES)[0]


WATCHED = [
    ("pods", fs.PODS, {"spec": {"containers": [{"name": "c"}]}}),
    ("namespaces", fs.NAMESPACES, {}),
    ("services", fs.SERVICES, {"spec": {"ports": [{"port": 80}]}}),
    ("networkpolicies", fs.NETWORK_POLICIES, {"spec": {"podSelector": {}}}),
    (
        "policyendpoints",
        fs.POLICY_ENDPOINTS,
        {"spec": {"policyRef": {"name": "x", "namespace": "default"}}},
    ),
    (
        "clusternetworkpolicies",
        fs.CLUSTER_NETWORK_POLICIES,
        {"spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}}}},
    ),
    ("clusterpolicyendpoints", fs.CLUSTER_POLICY_ENDPOINTS, {"spec": {"policyRef": {"name": "x"}}}),
]


@pytest.mark.parametrize(("plural", "resource", "body"), WATCHED, ids=[w[0] for w in WATCHED])
async def test_get_watch_prints_each_change(
    api: Api, plural: str, resource: fs.Resource, body: dict[str, object]
) -> None:
    """`kubectl get -w` prints the list, then a row for each change, as they happen."""
    proc = await asyncio.create_subprocess_exec(
        kubectl_path(), f"--kubeconfig={api.kubeconfig}", "get", plural, "-A", "-w",
        "--output-watch-events",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        await asyncio.sleep(1.0)  # listed, watching
        ns = "default" if resource.namespaced else None
        api.kube.store.create(resource, ns, {"metadata": {"name": "watched"}, **body})
        api.kube.store.patch(resource, ns or "", "watched", {"metadata": {"labels": {"a": "b"}}})
        api.kube.store.delete(resource, ns or "", "watched")
        seen: list[str] = []
        while len(seen) < 3:
            line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
            assert line, "kubectl's watch ended"
            if "watched" in line:
                seen.append(line.split()[0])
        assert seen == ["ADDED", "MODIFIED", "DELETED"]
    finally:
        proc.kill()
        await proc.wait()
