"""The Helm chart, rendered and linted offline with Helm's own SDK (helm-python-sdk)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from common.flags import parse_settings
from tests import chartqueries

CHART = Path(__file__).resolve().parents[2] / "charts" / "np-node-agent"
Obj = dict[str, Any]


def render(values: Obj | None = None) -> list[Obj]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values or {}, name="np", namespace="kube-system", is_install=True)
    return [
        doc
        for path, text in sorted(out.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def one(objs: list[Obj], kind: str, name_part: str = "") -> Obj:
    found = [o for o in objs if o["kind"] == kind and name_part in o["metadata"]["name"]]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def containers(objs: list[Obj]) -> dict[str, Obj]:
    ds = one(objs, "DaemonSet")
    return {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}


def settings_of(container: Obj, mode: str = "standard") -> Any:
    env = {"NETWORK_POLICY_ENFORCING_MODE": mode, "MY_NODE_NAME": "n1"}
    return parse_settings(container["command"][0], "", container["args"], env=env)


def test_lint_is_clean() -> None:
    for values in (
        {},
        {
            "resolver": {"enabled": True},
            "nodeAgent": {"enablePolicyEventLogs": True, "enableCloudWatchLogs": True},
        },
    ):
        report = helm.lint(CHART, values, strict=True)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [], report
        assert problems == [], report


def test_defaults_render_the_node_agent_with_minimal_privileges() -> None:
    objs = render()
    ds = one(objs, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert "initContainers" not in pod  # bpffs is the node's (no privileged container)
    cs = containers(objs)
    assert set(cs) == {"agent", "conntrack"}  # the shipper only with event logs on
    wanted_caps = {"agent": ["BPF", "NET_ADMIN", "PERFMON"], "conntrack": ["BPF", "NET_ADMIN"]}
    for name, c in cs.items():
        sc = c["securityContext"]
        assert sc["privileged"] is False
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"], "add": wanted_caps[name]}
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/sys/fs/bpf", "/var/run/np-agent"}
    agent = cs["agent"]
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8163}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8163}
    assert {p["name"]: p["containerPort"] for p in agent["ports"]} == {
        "metrics": 8162,
        "health": 8163,
    }
    volumes = {v["name"]: v["hostPath"] for v in pod["volumes"]}
    assert volumes == {
        "bpffs": {"path": "/sys/fs/bpf", "type": "Directory"},
        "run": {"path": "/var/run/np-agent", "type": "DirectoryOrCreate"},
    }
    crds = {o["metadata"]["name"]: o for o in objs if o["kind"] == "CustomResourceDefinition"}
    assert sorted(crds) == [
        "applicationnetworkpolicies.networking.k8s.aws",
        "clusternetworkpolicies.networking.k8s.aws",
        "clusterpolicyendpoints.networking.k8s.aws",
        "policyendpoints.networking.k8s.aws",
    ]
    for name in ("clusternetworkpolicies", "clusterpolicyendpoints"):
        crd = crds[f"{name}.networking.k8s.aws"]
        assert crd["spec"]["scope"] == "Cluster"
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        assert spec["properties"]["tier"]["enum"] == ["Admin", "Baseline"]
        assert spec["properties"]["priority"]["maximum"] == 1000
    cnp = crds["clusternetworkpolicies.networking.k8s.aws"]["spec"]["versions"][0]
    rule = cnp["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["egress"]["items"]
    assert "domainNames" in rule["x-kubernetes-validations"][0]["rule"]
    assert rule["properties"]["to"]["items"]["properties"]["domainNames"]["items"]["pattern"]
    assert not [o for o in objs if o["kind"] == "Deployment"]  # resolver off


def test_rbac_grants_exactly_the_verbs_used() -> None:
    objs = render({"resolver": {"enabled": True}})
    (agent,) = [
        r
        for r in objs
        if r["kind"] == "ClusterRole" and not r["metadata"]["name"].endswith("resolver")
    ]
    assert agent["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        {
            "apiGroups": ["networking.k8s.aws"],
            "resources": ["policyendpoints", "clusterpolicyendpoints"],
            "verbs": ["get", "list", "watch"],
        },
    ]
    resolver = one(objs, "ClusterRole", "resolver")
    assert resolver["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["pods", "namespaces", "services"],
            "verbs": ["list", "watch"],
        },
        {
            "apiGroups": ["networking.k8s.io"],
            "resources": ["networkpolicies"],
            "verbs": ["list", "watch"],
        },
        {
            "apiGroups": ["networking.k8s.aws"],
            "resources": ["clusternetworkpolicies", "applicationnetworkpolicies"],
            "verbs": ["list", "watch"],
        },
        {
            "apiGroups": ["networking.k8s.aws"],
            "resources": ["policyendpoints", "clusterpolicyendpoints"],
            "verbs": ["get", "list", "watch", "create", "update", "delete"],
        },
    ]
    dns = one(objs, "Role", "cluster-dns")
    assert dns["metadata"]["namespace"] == "kube-system"
    assert dns["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["services"],
            "resourceNames": ["kube-dns"],
            "verbs": ["get"],
        }
    ]
    for binding in (o for o in objs if o["kind"] == "ClusterRoleBinding"):
        role = binding["roleRef"]["name"]
        sa = binding["subjects"][0]["name"]
        assert any(o["kind"] == "ServiceAccount" and o["metadata"]["name"] == sa for o in objs), sa
        assert any(o["kind"] == "ClusterRole" and o["metadata"]["name"] == role for o in objs)


def test_every_value_reaches_the_processes_as_its_flag() -> None:
    objs = render(
        {
            "enableNetworkPolicy": True,
            "clusterName": "prod",
            "nodeAgent": {
                "enforcingMode": "strict",
                "enablePolicyEventLogs": True,
                "enableCloudWatchLogs": True,
                "enableIpv6": True,
                "networkPolicyAgentLogFileLocation": "/var/log/np/flows.log",
                "metricsBindAddr": "0.0.0.0:9162",
                "healthProbeBindAddr": ":9163",
                "conntrackCacheCleanupPeriod": 60,
                "conntrackCacheTableSize": 1048576,
                "logLevel": "info",
                "podInterfacePrefixes": "lxc",
                "shutdownTimeout": 20,
                "flowLogFormat": "json",
                "flowLogMaxBytes": 2147483648,
                "flowLogBackups": 9,
                "cloudwatchQueueSize": 5000000,
            },
        }
    )
    cs = containers(objs)
    assert set(cs) == {"agent", "conntrack", "flowlogs"}
    for c in cs.values():
        s = settings_of(c, mode="strict")
        # large integers survive Helm's float handling (no 1.048576e+06)
        assert (s.conntrack_cache_table_size, s.flow_log_max_bytes, s.cloudwatch_queue_size) == (
            1048576,
            2147483648,
            5000000,
        )
        assert (
            s.enable_network_policy,
            s.enable_policy_event_logs,
            s.enable_cloudwatch_logs,
            s.enable_ipv6,
        ) == (True, True, True, True)
        assert (s.log_level, s.log_file, s.flow_log_format, s.flow_log_backups) == (
            "info",
            "/var/log/np/flows.log",
            "json",
            9,
        )
        assert (s.metrics_bind_addr, s.health_probe_bind_addr) == ("0.0.0.0:9162", ":9163")
        assert (
            s.conntrack_cache_cleanup_period,
            s.pod_interface_prefixes,
            s.shutdown_timeout,
            s.enforcing_mode,
        ) == (60, ("lxc",), 20.0, "strict")
    assert {p["containerPort"] for p in cs["agent"]["ports"]} == {9162, 9163}
    assert cs["agent"]["readinessProbe"]["httpGet"]["port"] == 9163
    flow_env = {e["name"]: e.get("value") for e in cs["flowlogs"]["env"]}
    assert flow_env["CLUSTER_NAME"] == "prod"
    assert {"name": "logs", "mountPath": "/var/log/np"} in cs["flowlogs"]["volumeMounts"]


@pytest.mark.parametrize("timeout", [1, 10, 37.5, 120])
def test_grace_period_outlasts_every_process_shutdown_timeout(timeout: float) -> None:
    objs = render({"nodeAgent": {"shutdownTimeout": timeout}, "resolver": {"enabled": True}})
    for kind in ("DaemonSet", "Deployment"):
        spec = one(objs, kind)["spec"]["template"]["spec"]
        grace = spec["terminationGracePeriodSeconds"]
        assert grace == math.ceil(timeout) + 5
        for c in spec["containers"]:
            flags = [a for a in c["args"] if a.startswith("--shutdown-timeout=")]
            assert flags == [f"--shutdown-timeout={timeout}"]
            assert parse_settings("x", "", flags).shutdown_timeout == timeout < grace


def test_resolver_runs_unprivileged_as_non_root() -> None:
    objs = render({"resolver": {"enabled": True}})
    dep = one(objs, "Deployment", "resolver")
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    pdb = one(objs, "PodDisruptionBudget", "resolver")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    role = one(objs, "Role", "resolver")
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "update"],
        }
    ]
    spec = dep["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert "hostNetwork" not in spec
    (c,) = spec["containers"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8163}
    settings = settings_of(c)  # its flags parse
    assert settings.leader_elect
    assert settings.leader_election_namespace == dep["metadata"]["namespace"]
    assert [e["name"] for e in c["env"]] == ["POD_NAME"]


def test_eks_values_give_the_reference_mounts_and_install_the_cli() -> None:
    """values-eks.yaml: the VPC CNI's socket directory, the log directory and bpffs on
    the agent, the CNI and ipamd sockets there, the CLI wrapper copied to the node."""
    values = yaml.safe_load((CHART / "values-eks.yaml").read_text())
    objs = render(values)
    assert not [o for o in objs if o["kind"] == "CustomResourceDefinition"]
    assert not [o for o in objs if o["kind"] == "Deployment"], "no resolver on EKS"
    pod = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    agent = containers(objs)["agent"]
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/var/run/aws-node", "/sys/fs/bpf", "/var/log/aws-routed-eni"} <= mounts
    s = settings_of(agent)
    assert s.npa_socket == "/var/run/aws-node/npa.sock"
    assert s.ipamd_socket == "/var/run/aws-node/ipamd.sock"
    assert s.pod_interface_prefixes == ("eni", "vlan")
    (init,) = pod["initContainers"]
    assert init["command"][-1] == "/host/opt/cni/bin/aws-eks-na-cli"
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host["cni-bin-dir"] == "/opt/cni/bin"
    assert host["aws-node-run"] == "/var/run/aws-node"
    assert "privileged" not in init["securityContext"]


def test_optional_parts() -> None:
    objs = render(
        {
            "crd": {"install": False, "installCluster": False, "installApplication": False},
            "bpffs": {"mount": True},
        }
    )
    assert not [o for o in objs if o["kind"] == "CustomResourceDefinition"]
    pod = one(objs, "DaemonSet")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["securityContext"] == {"privileged": True}  # only to mount bpffs
    assert init["volumeMounts"][0]["mountPropagation"] == "Bidirectional"


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"nodeAgent": {"conntrackCacheTableSize": 1000}}, "conntrackCacheTableSize"),
        ({"nodeAgent": {"enforcingMode": "enforcing"}}, "enforcingMode"),
        ({"nodeAgent": {"logLevel": "verbose"}}, "logLevel"),
        ({"nodeAgent": {"shutdownTimeout": 0}}, "shutdownTimeout"),
        ({"nodeAgent": {"bpfPinRoot": "/tmp/pins"}}, "bpfPinRoot"),
        ({"resolver": {"endpointLayout": "cross"}}, "endpointLayout"),
        ({"resolver": {"endpointChunkSize": 0}}, "endpointChunkSize"),
    ],
)
def test_invalid_values_are_refused_naming_the_key(values: Obj, key: str) -> None:
    with pytest.raises(helm.HelmError) as err:
        render(values)
    assert key in str(err.value)


MONITORING = {
    "monitoring": {
        "dashboard": {"enabled": True, "annotations": {"grafana_folder": "Networking"}},
        "prometheusRule": {
            "enabled": True,
            "labels": {"release": "kube-prometheus-stack"},
            "pendingMinutes": 7,
            "tableFillRatio": 0.8,
        },
        "podMonitor": {"enabled": True},
    }
}


def test_dashboards_and_alerts_are_off_by_default() -> None:
    kinds = {o["kind"] for o in render()}
    assert not kinds & {"PrometheusRule", "PodMonitor"}
    assert not [o for o in render() if o["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_and_alerts_render_when_asked() -> None:
    report = helm.lint(CHART, MONITORING, strict=True)
    assert report["errors"] == [], report
    objs = render(MONITORING)
    cm = one(objs, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's label
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Networking"}
    dash = chartqueries.dashboard(objs)
    titles = " / ".join(p["title"] for p in dash["panels"]).lower()
    for topic in (
        "denied by direction",
        "denied by pod",
        "programming latency",
        "pods by enforcement status",
        "table fill",
        "ring buffer overruns",
        "cloudwatch backlog",
        "event-loop lag",
    ):
        assert topic in titles, topic
    rule = one(objs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(rules) == {
        "NetworkPolicyPodsNotProgrammed",
        "NetworkPolicyTableNearlyFull",
        "NetworkPolicyFlowLogRingOverruns",
        "NetworkPolicyCloudWatchDrops",
        "NetworkPolicyAgentNotReady",
    }
    assert rules["NetworkPolicyPodsNotProgrammed"]["for"] == "7m"
    assert rules["NetworkPolicyTableNearlyFull"]["expr"].endswith("> 0.8")
    assert "80" in rules["NetworkPolicyTableNearlyFull"]["annotations"]["summary"]
    assert "{{ $labels.instance }}" in rules["NetworkPolicyAgentNotReady"]["annotations"]["summary"]
    monitor = one(objs, "PodMonitor")
    ds = one(objs, "DaemonSet")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        ds["spec"]["template"]["metadata"]["labels"].items()
    )
    ports = {p["name"] for c in containers(objs).values() for p in c.get("ports", [])}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
    # every query reads only metrics of the node's processes (checked against a running
    # agent's scrape in tests/privileged/test_local_api.py)
    for expr in chartqueries.queries(objs):
        assert chartqueries.metric_names(expr), expr


def test_monitoring_values_are_checked() -> None:
    with pytest.raises(helm.HelmError):
        render({"monitoring": {"prometheusRule": {"tableFillRatio": 2}}})
    with pytest.raises(helm.HelmError):
        render({"monitoring": {"dashboard": {"enabeld": True}}})
