"""np-sandbox: a simulated node that stays up, to try policies with kubectl.

``np-sandbox`` (or ``np-sandbox up``) starts what the demo starts -- network-namespace
pods of the EKS walkthrough, the fake API server, np-resolver, np-agent, np-conntrack and
np-flowlogs -- prints the ``KUBECONFIG`` to use and a few commands to try, and stays up
until Ctrl-C (or SIGTERM), then removes every process, namespace, veth and pin.

The fake API server validates what is written as the real one does and speaks what the
real kubectl needs (discovery, tables, apply, server-side apply, watches). Pods:

- ``np-sandbox pod add NS/NAME --label app=web --port 80/TCP`` adds a pod whose server
  answers its name on the given ports (a namespace that does not exist is created);
- a Pod written with ``kubectl apply -f`` is started the same way, its container ports
  served; ``kubectl delete`` removes it;
- ``np-sandbox probe NS/A NS/B 80/TCP`` sends real traffic from one pod to the other over
  IPv4 and IPv6 and says whether it passed and, if not, which rule denies it.

The helpers talk to the running sandbox over a Unix socket in its state directory
(``/run/np-sandbox`` unless ``--state-dir`` says otherwise). Pod names are unique across
namespaces in the sandbox (one network namespace per name).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from common.localapi import ApiError as LocalApiError
from common.localapi import LocalClient, Unavailable
from simnode import sandboxapi as api
from simnode.sandboxapi import STATE_DIR, parse_port, parse_ref


# ---- the helpers --------------------------------------------------------------------------
async def _client(state_dir: Path) -> LocalClient:
    client = LocalClient(str(state_dir / api.CONTROL), process="np-sandbox")
    try:
        await client.get("/v1/status", api.Status, timeout=5)
    except Unavailable:
        raise SystemExit(
            f"np-sandbox: no sandbox is running ({state_dir}); start one with scripts/sandbox.sh"
        ) from None
    return client


async def cmd_env(client: LocalClient, args: argparse.Namespace) -> int:
    st = await client.get("/v1/status", api.Status)
    print(f"export KUBECONFIG={st.kubeconfig}")
    return 0


async def cmd_pods(client: LocalClient, args: argparse.Namespace) -> int:
    st = await client.get("/v1/status", api.Status)
    for p in sorted(st.pods, key=lambda p: (p.namespace, p.name)):
        labels = ",".join(f"{k}={v}" for k, v in sorted(p.labels.items())) or "<none>"
        print(
            f"{p.namespace + '/' + p.name:<32} {p.ipv4:<13} {p.ipv6:<16} "
            f"{' '.join(p.listen) or '-':<16} {labels}"
        )
    return 0


async def cmd_pod(client: LocalClient, args: argparse.Namespace) -> int:
    ns, name = parse_ref(args.pod)
    if args.action == "delete":
        await client.request("DELETE", f"/v1/pods/{ns}/{name}", api.Done, timeout=60)
        print(f"pod {ns}/{name} deleted")
        return 0
    for port in args.port:
        parse_port(port)
    body = api.AddPod(
        namespace=ns,
        name=name,
        labels=dict(_label(x) for x in args.label),
        listen=args.port or ["80/TCP"],
    )
    info = await client.request("POST", "/v1/pods", api.PodInfo, body=body, timeout=60)
    print(f"pod {info.namespace}/{info.name} added: {info.ipv4} {info.ipv6}")
    return 0


async def cmd_settle(client: LocalClient, args: argparse.Namespace) -> int:
    res = await client.request(
        "POST",
        "/v1/settle",
        api.Settled,
        params={"timeout": str(args.timeout)},
        timeout=args.timeout + 10,
    )
    if not res.programmed:
        print(f"not programmed after {args.timeout:g} s: {', '.join(res.pending)}")
        return 3
    print("every pod is programmed with what was written")
    return 0


async def cmd_probe(client: LocalClient, args: argparse.Namespace) -> int:
    parse_ref(args.client)
    parse_ref(args.server)
    port, protocol = parse_port(args.port)
    body = api.ProbeRequest(
        client=args.client,
        server=args.server,
        port=port,
        protocol=protocol,
        families=[args.family] if args.family else [4, 6],
    )
    res = await client.request("POST", "/v1/probe", api.ProbeResult, body=body, timeout=30)
    for family, ok in sorted(res.allowed.items()):
        verdict = "allowed" if ok else "denied"
        print(f"{args.client} -> {args.server} {port}/{protocol} IPv{family}: {verdict}")
    if res.why:
        print(f"why: {res.why}")
    return 0 if all(res.allowed.values()) else 3


HELPERS = {
    "env": cmd_env,
    "pods": cmd_pods,
    "pod": cmd_pod,
    "settle": cmd_settle,
    "probe": cmd_probe,
}


async def helper(args: argparse.Namespace) -> int:
    """A helper command against the running sandbox: 0 done, 3 a denied probe or not
    settled in time, 1 the sandbox refused or did not answer."""
    client = await _client(Path(args.state_dir))
    try:
        return await HELPERS[args.command](client, args)
    except (Unavailable, LocalApiError) as exc:
        print(f"np-sandbox: {exc}", file=sys.stderr)
        return 1


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--label {text!r} is not KEY=VALUE")
    return key, value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="np-sandbox", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2],
    )  # fmt: skip
    parser.add_argument(
        "--state-dir", default=STATE_DIR, help=f"where the sandbox keeps its state ({STATE_DIR})"
    )
    sub = parser.add_subparsers(dest="command")
    p_up = sub.add_parser("up", help="start the sandbox (the default) and stay up until Ctrl-C")
    p_up.add_argument("--no-color", action="store_true", help="plain output")
    p_up.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    sub.add_parser("env", help="print the export KUBECONFIG=... line")
    sub.add_parser("pods", help="the sandbox's pods, their addresses and ports")
    p_pod = sub.add_parser("pod", help="add or delete a pod")
    pod_sub = p_pod.add_subparsers(dest="action", required=True)
    p_add = pod_sub.add_parser("add", help="a pod with a server on the given ports")
    p_add.add_argument("pod", metavar="NAMESPACE/NAME")
    p_add.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p_add.add_argument(
        "--port", action="append", default=[], metavar="PORT/PROTOCOL", help="80/TCP (default)"
    )
    p_del = pod_sub.add_parser("delete", help="remove a pod")
    p_del.add_argument("pod", metavar="NAMESPACE/NAME")
    p_settle = sub.add_parser(
        "settle",
        help="wait until the policies written so far are programmed (exit 3 if not in time)",
    )
    p_settle.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS")
    p_probe = sub.add_parser(
        "probe", help="real traffic from one pod to another (exit 3 if any is denied)"
    )
    p_probe.add_argument("client", metavar="NAMESPACE/CLIENT")
    p_probe.add_argument("server", metavar="NAMESPACE/SERVER")
    p_probe.add_argument("port", metavar="PORT/PROTOCOL")
    p_probe.add_argument("--family", type=int, choices=(4, 6), help="one IP family only")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("np-sandbox: run as root (the sandbox creates network namespaces and loads eBPF)")
    try:
        if args.command in (None, "up"):
            from simnode.sandboxnode import up  # the node's imports, for this command only

            (Path(args.state_dir) / "node").mkdir(parents=True, exist_ok=True)
            sys.exit(
                asyncio.run(
                    up(
                        state_dir=Path(args.state_dir),
                        color=not getattr(args, "no_color", False) and sys.stdout.isatty(),
                        keep_logs=getattr(args, "keep_logs", False),
                    )
                )
            )
        sys.exit(asyncio.run(helper(args)))
    except ValueError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
