"""Command-line flags and environment shared by the node processes.

The reference agent's flags keep their names and defaults (``--enable-network-policy``,
``--conntrack-cache-table-size``, ...), so the same argument list can be given to every
process; each uses what concerns it. Values are validated by pydantic; a bad value exits
with status 2 and a message naming the flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.paths import DEFAULT_PIN_ROOT, DEFAULT_RUNTIME_DIR

# the datapath's conntrack map bounds (bpf/np.h NP_CT_MIN/MAX_ENTRIES: tests/unit/test_flags
# checks they agree; common does not import bpf, the dependency runs bpf -> common)
CT_MIN_ENTRIES = 32768
CT_MAX_ENTRIES = 1048576


class Settings(BaseModel):
    """Validated settings; every field names its unit and why it exists."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    enable_network_policy: bool = False
    """Enforce NetworkPolicy at all (reference flag). Off: the agent only reports health."""
    enable_policy_event_logs: bool = False
    """Record policy decisions (reference flag): DENY always, ACCEPT at debug level."""
    enable_cloudwatch_logs: bool = False
    """Ship decision logs to CloudWatch Logs (reference flag); needs event logs."""
    enable_ipv6: bool = False
    """Reference flag, accepted for compatibility: both IP families are always enforced."""
    log_level: Literal["debug", "info", "warn", "error"] = "debug"
    """Logging verbosity (reference flag and default)."""
    log_file: str = "/var/log/aws-routed-eni/network-policy-agent.log"
    """Where decision (flow) logs are written (reference flag and default)."""
    conntrack_cache_cleanup_period: int = Field(default=300, ge=1, le=86400)
    """Seconds between conntrack cache sweeps (reference flag and default)."""
    conntrack_cache_table_size: int = Field(default=524288, ge=CT_MIN_ENTRIES, le=CT_MAX_ENTRIES)
    """Entries of the datapath's conntrack map (reference flag); fixed once the map exists."""
    metrics_bind_addr: str = ":8162"
    """host:port of the Prometheus endpoint (reference flag and default)."""
    health_probe_bind_addr: str = ":8163"
    """host:port of /healthz and /readyz (reference flag and default)."""
    enforcing_mode: Literal["standard", "strict"] = "standard"
    """NETWORK_POLICY_ENFORCING_MODE: new pods default-allow (standard) or default-deny
    (strict) until their policies are programmed."""
    node_name: str = ""
    """This node's name (MY_NODE_NAME): selects the local pods."""
    kubeconfig: str | None = None
    """Kubeconfig file; unset means the in-cluster service account."""
    bpf_pin_root: str = DEFAULT_PIN_ROOT
    """bpffs directory holding the datapath's pinned maps and programs."""
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    """Directory of the processes' local API sockets."""
    pod_interface_prefixes: tuple[str, ...] = ("eni", "vlan", "veth")
    """Name prefixes of host-side pod veths, attached at their first appearance (VPC
    CNI: eni, and vlan for branch-ENI pods; kindnet/ptp/bridge: veth)."""
    npa_socket: str = "/var/run/aws-node/npa.sock"
    """Unix socket (0600) serving the VPC CNI's calls, EnforceNpToPod and DeletePodNp
    (the path the CNI plugin dials)."""
    ipamd_socket: str = "/var/run/aws-node/ipamd.sock"
    """ipamd's socket: if it answers at start, the mode, node addresses and multi-NIC
    setting come from it (as with the reference agent), else from flags and env."""
    cni_answer_timeout: float = Field(default=3.0, ge=0, le=60)
    """Seconds EnforceNpToPod waits for a new pod's known policies to be programmed
    before answering; after that it answers with the mode's default in force."""
    cluster_dns: tuple[str, ...] = ()
    """Addresses of the cluster DNS (the kube-dns Service's ClusterIPs, or its pods):
    queries of pods with domain-name egress rules to them go through the agent's DNS
    proxy, which learns the answers' addresses for the pod before releasing them.
    Empty: domain rules learn nothing (their names open nothing)."""
    dns_proxy_port: int = Field(default=10053, ge=1024, le=65000)
    """First local UDP port of the DNS proxy (one per cluster DNS address, upward)."""
    fqdn_ttl_grace: float = Field(default=30.0, ge=0, le=3600)
    """Seconds a learned address stays open after its answer's TTL (clients cache
    answers a little longer than told); connections opened meanwhile outlive it."""
    shutdown_timeout: float = Field(default=10.0, gt=0, le=120)
    """Seconds a process takes at most to stop after SIGTERM."""
    flow_log_format: Literal["text", "json"] = "text"
    """Flow log lines in the reference's text format, or JSON lines."""
    flow_log_max_bytes: int = Field(default=100 * 1024 * 1024, ge=4096)
    """Size at which the flow log file is rotated, bytes."""
    flow_log_backups: int = Field(default=5, ge=0, le=100)
    """Rotated flow log files kept."""
    flow_log_file_mode: int = Field(default=0o600, ge=0, le=0o666)
    """Mode of the flow log files created (octal, e.g. 0640): 0600 by default, since
    flow logs show every pod's connections to whoever can read them."""
    cluster_name: str = ""
    """The cluster's name (CLUSTER_NAME): CloudWatch group /aws/eks/<name>/cluster;
    unset: /aws/k8s-cluster/cluster, the reference's group outside EKS."""
    cloudwatch_queue_size: int = Field(default=100_000, ge=1000, le=10_000_000)
    """Events waiting for CloudWatch at most; beyond, they spill to a local file."""
    endpoint_chunk_size: int = Field(default=200, ge=1, le=10_000)
    """np-resolver: pods, ingress entries and egress entries per PolicyEndpoint at most
    (the AWS controller's flag and default)."""
    endpoint_layout: Literal["paired", "controller"] = "paired"
    """np-resolver: how a policy's objects are laid out (see resolver.layout): every
    pod chunk paired with every rule chunk, or packed independently as the AWS
    controller does (pod-only and rule-only objects)."""
    leader_elect: bool = True
    """np-resolver: only the holder of a coordination.k8s.io Lease writes, so several
    replicas can run (controller-runtime's leader election)."""
    leader_election_namespace: str = "kube-system"
    """np-resolver: namespace of the Lease."""
    leader_election_id: str = "np-resolver"
    """np-resolver: name of the Lease."""
    leader_election_lease_duration: float = Field(default=15.0, ge=1, le=600)
    """np-resolver: seconds a leader's Lease is valid without renewal; a standby takes
    over after this long (controller-runtime's default)."""
    leader_election_renew_deadline: float = Field(default=10.0, ge=0.5, le=600)
    """np-resolver: seconds the leader keeps trying to renew before it stops writing
    (shorter than the lease duration, so it stops before anyone else may start)."""
    leader_election_retry_period: float = Field(default=2.0, ge=0.1, le=60)
    """np-resolver: seconds between attempts to acquire or renew."""

    @field_validator("metrics_bind_addr", "health_probe_bind_addr")
    @classmethod
    def _bind(cls, value: str) -> str:
        parse_bind_addr(value)
        return value

    @field_validator("flow_log_file_mode", mode="before")
    @classmethod
    def _octal(cls, value: object) -> object:
        if isinstance(value, str):
            text = value
            try:
                value = int(text, 8)
            except ValueError:
                raise ValueError(
                    f"expected an octal file mode such as 0600, got {text[:20]!r}"
                ) from None
        if isinstance(value, int) and not 0 <= value <= 0o666:
            raise ValueError(f"{value:04o} is not a mode from 0000 to 0666 (no execute bits)")
        return value

    @field_validator("cluster_dns", mode="before")
    @classmethod
    def _addresses(cls, value: object) -> object:
        import ipaddress

        if isinstance(value, str):
            value = tuple(p.strip() for p in value.split(",") if p.strip())
        if isinstance(value, tuple | list):
            for item in value:
                try:
                    ipaddress.ip_address(item)
                except ValueError:
                    raise ValueError(f"{str(item)[:60]!r} is not an IP address") from None
        return value

    @field_validator("pod_interface_prefixes", mode="before")
    @classmethod
    def _prefixes(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value


def parse_bind_addr(value: str) -> tuple[str, int]:
    """``:8162``, ``0.0.0.0:8162``, ``[::1]:8162`` or a bare port -> (host, port)."""
    text = value.strip()
    if text.isdigit():
        host, port_s = "", text
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected host:port, got {value!r}")
        host = host.strip("[]")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"invalid port in {value!r}")
    return host, int(port_s)


_FLAG_OF = {
    "enforcing_mode": "NETWORK_POLICY_ENFORCING_MODE",
    "node_name": "--node-name (or MY_NODE_NAME)",
}


def flag_name(field: str) -> str:
    return _FLAG_OF.get(field, "--" + field.replace("_", "-"))


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# Settings read from the environment only (the reference's variable), never a flag.
ENV_ONLY = frozenset({"enforcing_mode"})


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Every Settings field is a flag (its name with dashes; help from its docstring),
    plus the reference agent's names for the flow log's rotation."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    for field, info in Settings.model_fields.items():
        if field in ENV_ONLY:
            continue
        kind = info.annotation
        kw: dict[str, Any] = {
            "dest": field,
            "help": (info.description or "").replace("%", "%%"),
            "metavar": _metavar(kind, info.description or ""),
        }
        if kind is bool:
            kw.update(type=_bool, nargs="?", const=True)
        p.add_argument(f"--{field.replace('_', '-')}", **kw)
    # the reference agent's names for the (flow) log file's rotation: MB and files
    p.add_argument(
        "--log-file-max-size",
        metavar="MB",
        type=_megabytes,
        dest="flow_log_max_bytes",
        help="--flow-log-max-bytes in MB (the reference agent's flag)",
    )
    p.add_argument(
        "--log-file-max-backups",
        metavar="N",
        dest="flow_log_backups",
        help="--flow-log-backups (the reference agent's flag)",
    )
    # the reference agent's flags with no meaning here: accepted (and validated), so that
    # its command line runs unchanged; the enforcer batches every change itself, and
    # profiling is Go's pprof
    p.add_argument(
        "--max-concurrent-reconciles",
        metavar="N",
        type=_positive,
        dest=IGNORED_PREFIX + "max_concurrent_reconciles",
        help="accepted for compatibility (the reference agent's flag); no effect",
    )
    p.add_argument(
        "--enable-profiling",
        metavar="BOOL",
        type=_bool,
        nargs="?",
        const=True,
        dest=IGNORED_PREFIX + "enable_profiling",
        help="accepted for compatibility (the reference agent's flag); no effect",
    )
    return p


IGNORED_PREFIX = "ignored_"


def _positive(text: str, unit: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        of = f" of {unit}" if unit else ""
        raise argparse.ArgumentTypeError(f"expected a whole number{of}, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1{' ' + unit if unit else ''}, got {text!r}"
        )
    return value


def _metavar(kind: Any, doc: str) -> str | None:
    if kind is bool:
        return "BOOL"
    if get_origin(kind) is Literal:
        return "|".join(str(a) for a in get_args(kind))
    if kind == tuple[str, ...]:
        return "A,B"
    low = doc.lower()
    if "octal" in low:
        return "OCTAL"
    if "host:port" in low:
        return "HOST:PORT"
    if kind in (int, float):
        return "SECONDS" if "seconds" in low else "N"
    return None


def _megabytes(text: str) -> int:
    return _positive(text, "MB") * 1024 * 1024


def parse_settings(
    prog: str,
    description: str,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Flags and environment -> Settings, or exit 2 naming the offending flag."""
    env = os.environ if env is None else env
    args = parser(prog, description).parse_args(argv)
    values = {
        k: v for k, v in vars(args).items() if v is not None and not k.startswith(IGNORED_PREFIX)
    }
    if "NETWORK_POLICY_ENFORCING_MODE" in env:
        values["enforcing_mode"] = env["NETWORK_POLICY_ENFORCING_MODE"].strip().lower()
    values.setdefault("node_name", env.get("MY_NODE_NAME", ""))
    if "kubeconfig" not in values and env.get("KUBECONFIG"):
        values["kubeconfig"] = env["KUBECONFIG"]
    if "cluster_name" not in values and env.get("CLUSTER_NAME"):
        values["cluster_name"] = env["CLUSTER_NAME"]
    try:
        settings = Settings.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else "?"
        got = values.get(field)
        sys.stderr.write(
            f"{prog}: invalid {flag_name(field)}={got!r}: "
            f"{err['msg'].removeprefix('Value error, ')}\n"
        )
        raise SystemExit(2) from None
    if settings.enable_cloudwatch_logs and not settings.enable_policy_event_logs:
        sys.stderr.write(
            f"{prog}: invalid --enable-cloudwatch-logs=true: "
            "needs --enable-policy-event-logs=true\n"
        )
        raise SystemExit(2)
    if settings.leader_election_renew_deadline >= settings.leader_election_lease_duration:
        sys.stderr.write(
            f"{prog}: invalid --leader-election-renew-deadline="
            f"{settings.leader_election_renew_deadline}: must be shorter than "
            "--leader-election-lease-duration\n"
        )
        raise SystemExit(2)
    return settings
