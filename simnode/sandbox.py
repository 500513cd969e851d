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
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from bpf.datapath import Datapath
from common.localapi import ApiError as LocalApiError
from common.localapi import LocalClient, Unavailable
from fakekube import store as fs
from fakekube.store import ApiError, Watcher
from simnode.demo import PODS, Demo, DemoPod
from simnode.node import SimPod

STATE_DIR = "/run/np-sandbox"
CONTROL = "control.sock"
NODE = "sandbox-node"
_PORT = re.compile(r"^(\d{1,5})(?:/(TCP|UDP|tcp|udp))?$")
_REF = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)/([a-z0-9]([-a-z0-9]*[a-z0-9])?)$")


# ---- the control API's messages -----------------------------------------------------------
class PodInfo(BaseModel):
    namespace: str
    name: str
    labels: dict[str, str]
    ipv4: str
    ipv6: str
    host_veth: str
    listen: list[str]  # "80/TCP"


class Status(BaseModel):
    kubeconfig: str
    runtime_dir: str
    workdir: str
    pods: list[PodInfo]


class AddPod(BaseModel):
    namespace: str
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    listen: list[str] = Field(default_factory=lambda: ["80/TCP"])


class ProbeRequest(BaseModel):
    client: str  # namespace/name
    server: str
    port: int = Field(ge=1, le=65535)
    protocol: Literal["TCP", "UDP"] = "TCP"
    families: list[int] = Field(default_factory=lambda: [4, 6])  # 4 and/or 6


class ProbeResult(BaseModel):
    allowed: dict[int, bool]  # family -> passed
    why: str = ""  # the agent's explanation when a family was denied


def parse_port(text: str) -> tuple[int, str]:
    """``80/TCP`` (or ``53/udp``, or ``80``: TCP) -> (80, "TCP")."""
    m = _PORT.match(text.strip())
    if not m or not 1 <= int(m.group(1)) <= 65535:
        raise ValueError(f"{text!r} is not PORT/PROTOCOL (e.g. 80/TCP, 53/UDP)")
    return int(m.group(1)), (m.group(2) or "TCP").upper()


def parse_ref(text: str) -> tuple[str, str]:
    """``namespace/name`` -> (namespace, name)."""
    m = _REF.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not NAMESPACE/NAME (lowercase, e.g. default/demo-app)")
    return m.group(1), m.group(3)


# ---- the running sandbox ------------------------------------------------------------------
class Sandbox:
    def __init__(self, *, state_dir: Path, color: bool) -> None:
        self.state_dir = state_dir
        self.demo = Demo(color=color, workdir=state_dir / "node", node=NODE, admission=True)
        self.kubeconfig = state_dir / "kubeconfig"
        self.control = state_dir / CONTROL
        self.listen: dict[str, tuple[tuple[int, str], ...]] = {}  # pod name -> ports
        self._runner: web.AppRunner | None = None
        self._lock = asyncio.Lock()  # one pod change at a time

    @property
    def store(self) -> fs.Store:
        return self.demo.stack.api.store

    async def start(self) -> None:
        await self.demo.setup()
        for spec in PODS:
            self.listen[spec.name] = spec.listen
        # kubectl runs on the host: the API server listens on its loopback too
        host = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        host.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        host.bind(("127.0.0.1", 0))
        url = await self.demo.stack.api.listen_also(host)
        self.demo.stack.api.write_kubeconfig(str(self.kubeconfig), url=url)
        app = web.Application()
        app.router.add_get("/v1/status", self._status)
        app.router.add_post("/v1/pods", self._add_pod)
        app.router.add_delete("/v1/pods/{namespace}/{name}", self._delete_pod)
        app.router.add_post("/v1/probe", self._probe)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        await web.UnixSite(self._runner, str(self.control)).start()
        os.chmod(self.control, 0o600)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        await self.demo.close()

    # ---- pods ---------------------------------------------------------------------------
    def info(self, pod: SimPod) -> PodInfo:
        return PodInfo(
            namespace=pod.namespace,
            name=pod.name,
            labels=pod.labels,
            ipv4=str(pod.ipv4),
            ipv6=str(pod.ipv6),
            host_veth=pod.host_veth,
            listen=[f"{p}/{proto}" for p, proto in self.listen.get(pod.name, ())],
        )

    async def add_pod(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str],
        listen: Sequence[tuple[int, str]],
        *,
        written: dict[str, Any] | None = None,
    ) -> SimPod:
        """A new pod (its namespace created if missing); ``written``: its Pod object, as a
        client wrote it. ValueError if the name is taken."""
        async with self._lock:
            if name in self.demo.pods or name in self.demo.sim.pods:
                taken = self.demo.pods.get(name) or self.demo.sim.pods[name]
                raise ValueError(
                    f"a pod named {name} exists ({taken.namespace}/{name}): names are unique "
                    "across namespaces in the sandbox"
                )
            if written is None:
                self._ensure_namespace(namespace)
            pod, _ = await self.demo.add_pod(
                DemoPod(namespace, name, dict(labels), tuple(listen)), written=written
            )
            self.listen[name] = tuple(listen)
            return pod

    async def remove_pod(self, namespace: str, name: str, *, delete_object: bool = True) -> None:
        async with self._lock:
            pod = self.demo.pods.get(name)
            if pod is None or pod.namespace != namespace:
                raise KeyError(f"{namespace}/{name}")
            self.demo.pod_uids.pop(name, None)  # its object's deletion is no news
            server = self.demo.servers.pop(name, None)
            if server is not None:
                await server.close()
            await self.demo.sim.remove_pod(name)
            self.demo.pods.pop(name, None)
            self.listen.pop(name, None)
            if delete_object:
                with contextlib.suppress(ApiError):
                    self.store.delete(fs.PODS, namespace, name)

    def _ensure_namespace(self, namespace: str) -> None:
        with contextlib.suppress(ApiError):
            self.store.create(fs.NAMESPACES, None, {"metadata": {"name": namespace}})

    async def follow_pods(self) -> None:
        """Start each Pod written by a client (kubectl) that no node holds yet, and stop
        a pod when its object is deleted. A pod that cannot start is reported, and the
        others go on."""
        watcher = Watcher(fs.PODS, None, None, None)
        self.store.watchers.add(watcher)
        try:
            while True:
                item = await watcher.queue.get()
                if item is None:
                    return
                obj = item.get("object") or {}
                meta = obj.get("metadata") or {}
                ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
                uid = meta.get("uid")
                if item.get("type") == "DELETED" and uid == self.demo.pod_uids.get(name):
                    with contextlib.suppress(KeyError):
                        await self.remove_pod(ns, name, delete_object=False)
                elif item.get("type") == "ADDED" and uid not in self.demo.pod_uids.values():
                    try:
                        await self._start_written_pod(obj)
                    except Exception as exc:  # one pod's failure is reported, not fatal
                        print(f"  could not start pod {ns}/{name}: {exc}", flush=True)
        finally:
            self.store.watchers.discard(watcher)

    async def _start_written_pod(self, obj: dict[str, Any]) -> None:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
        if (obj.get("status") or {}).get("podIP") or spec.get("nodeName") not in (None, "", NODE):
            return  # placed already, or on another node
        listen = [
            (int(p["containerPort"]), str(p.get("protocol", "TCP")).upper())
            for c in spec.get("containers") or []
            for p in (c.get("ports") or [])
            if isinstance(p, dict) and isinstance(p.get("containerPort"), int)
        ]
        pod = await self.add_pod(ns, name, dict(meta.get("labels") or {}), listen, written=obj)
        print(
            f"  pod {ns}/{name} started (written with kubectl): {pod.ipv4} {pod.ipv6}", flush=True
        )

    # ---- the control API ------------------------------------------------------------------
    async def _status(self, _: web.Request) -> web.Response:
        status = Status(
            kubeconfig=str(self.kubeconfig),
            runtime_dir=self.demo.stack.runtime_dir,
            workdir=str(self.demo.workdir),
            pods=[self.info(p) for p in self.demo.pods.values()],
        )
        return web.json_response(text=status.model_dump_json())

    async def _add_pod(self, request: web.Request) -> web.Response:
        try:
            ask = AddPod.model_validate_json(await request.text())
            parse_ref(f"{ask.namespace}/{ask.name}")
            listen = [parse_port(p) for p in ask.listen]
            pod = await self.add_pod(ask.namespace, ask.name, ask.labels, listen)
        except ValueError as exc:
            return _fail(400, str(exc))
        return web.json_response(text=self.info(pod).model_dump_json())

    async def _delete_pod(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        try:
            await self.remove_pod(ns, name)
        except KeyError:
            return _fail(404, f"no pod {ns}/{name} in the sandbox")
        return web.json_response({})

    async def _probe(self, request: web.Request) -> web.Response:
        try:
            ask = ProbeRequest.model_validate_json(await request.text())
            pods = [self._pod(ref) for ref in (ask.client, ask.server)]
            if not ask.families or set(ask.families) - {4, 6}:
                raise ValueError("families are 4 and/or 6")
        except ValueError as exc:
            return _fail(400, str(exc))
        allowed = {
            f: await self.demo.probe_pods(pods[0], pods[1], ask.port, ask.protocol, f)
            for f in ask.families
        }
        why = ""
        if not all(allowed.values()):
            why = await self.demo.explain_pods(pods[0], pods[1], ask.port, ask.protocol)
        return web.json_response(text=ProbeResult(allowed=allowed, why=why).model_dump_json())

    def _pod(self, ref: str) -> SimPod:
        ns, name = parse_ref(ref)
        pod = self.demo.pods.get(name)
        if pod is None or pod.namespace != ns:
            raise ValueError(f"no pod {ns}/{name} in the sandbox")
        return pod


def _fail(status: int, message: str) -> web.Response:
    return web.json_response({"error": message.splitlines()[0]}, status=status)


class Done(BaseModel):
    pass


def _intro(sandbox: Sandbox) -> str:
    here = Path.cwd()
    walkthrough = Path(__file__).resolve().parents[1] / "examples" / "walkthrough"
    shown = os.path.relpath(walkthrough, here) if walkthrough.is_relative_to(here) else walkthrough
    run = sandbox.demo.stack.runtime_dir
    client = sandbox.demo.pods["client-one"].ipv4
    me = "np-sandbox" + (
        "" if str(sandbox.state_dir) == STATE_DIR else f" --state-dir {sandbox.state_dir}"
    )
    return f"""
The sandbox is up. In another shell:

  export KUBECONFIG={sandbox.kubeconfig}
  kubectl get pods -A -o wide
  kubectl apply -f {shown}/01-deny-all-ingress.yaml
  {me} probe default/client-one default/demo-app 80/TCP
  np-cli --runtime-dir {run} explain default/demo-app --peer {client} --port 80
  kubectl get policyendpoints -A -w
  {me} pod add default/web --label app=web --port 8080/TCP

Pods written with kubectl apply -f start too. Logs: {sandbox.demo.workdir}
Ctrl-C stops the sandbox and removes everything.
"""


async def up(*, state_dir: Path, color: bool, keep_logs: bool) -> int:
    if (state_dir / CONTROL).exists():
        client = LocalClient(str(state_dir / CONTROL), process="np-sandbox")
        try:
            await client.get("/v1/status", Status, timeout=2)
            print(f"np-sandbox: a sandbox is already running ({state_dir})", file=sys.stderr)
            return 1
        except Unavailable:
            pass  # left over from one that did not clean up
    sandbox = Sandbox(state_dir=state_dir, color=color)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if task is not None:
            loop.add_signal_handler(sig, task.cancel)
    follower: asyncio.Task[None] | None = None
    try:
        await sandbox.start()
        follower = asyncio.create_task(sandbox.follow_pods(), name="sandbox-follow-pods")
        print(_intro(sandbox), flush=True)
        await follower
        return 0
    except asyncio.CancelledError:
        print("\nstopping the sandbox", flush=True)
        return 0
    except Exception as exc:  # reported, then everything is removed
        print(f"\nnp-sandbox failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        if follower is not None and not follower.done():
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        await sandbox.close()
        Datapath.unpin(sandbox.demo.pin_root)
        if keep_logs:
            print(f"logs kept in {sandbox.demo.workdir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
        print("cleaned up: processes stopped; namespaces, veths and pins removed", flush=True)


# ---- the helpers --------------------------------------------------------------------------
async def _client(state_dir: Path) -> LocalClient:
    client = LocalClient(str(state_dir / CONTROL), process="np-sandbox")
    try:
        await client.get("/v1/status", Status, timeout=5)
    except Unavailable:
        raise SystemExit(
            f"np-sandbox: no sandbox is running ({state_dir}); start one with np-sandbox up"
        ) from None
    return client


async def helper(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    client = await _client(state_dir)
    try:
        if args.command == "env":
            st = await client.get("/v1/status", Status)
            print(f"export KUBECONFIG={st.kubeconfig}")
        elif args.command == "pods":
            st = await client.get("/v1/status", Status)
            for p in sorted(st.pods, key=lambda p: (p.namespace, p.name)):
                labels = ",".join(f"{k}={v}" for k, v in sorted(p.labels.items())) or "<none>"
                print(
                    f"{p.namespace + '/' + p.name:<32} {p.ipv4:<13} {p.ipv6:<16} "
                    f"{' '.join(p.listen) or '-':<16} {labels}"
                )
        elif args.command == "pod" and args.action == "add":
            ns, name = parse_ref(args.pod)
            for port in args.port:
                parse_port(port)
            info = await client.request(
                "POST",
                "/v1/pods",
                PodInfo,
                body=AddPod(
                    namespace=ns,
                    name=name,
                    labels=dict(_label(x) for x in args.label),
                    listen=args.port or ["80/TCP"],
                ),
                timeout=60,
            )
            print(f"pod {info.namespace}/{info.name} added: {info.ipv4} {info.ipv6}")
        elif args.command == "pod" and args.action == "delete":
            ns, name = parse_ref(args.pod)
            await client.request("DELETE", f"/v1/pods/{ns}/{name}", Done, timeout=60)
            print(f"pod {ns}/{name} deleted")
        elif args.command == "probe":
            parse_ref(args.client)
            parse_ref(args.server)
            port, protocol = parse_port(args.port)
            res = await client.request(
                "POST",
                "/v1/probe",
                ProbeResult,
                body=ProbeRequest(
                    client=args.client,
                    server=args.server,
                    port=port,
                    protocol=protocol,  # type: ignore[arg-type]
                    families=[args.family] if args.family else [4, 6],
                ),
                timeout=30,
            )
            for family, ok in sorted(res.allowed.items()):
                print(
                    f"{args.client} -> {args.server} {port}/{protocol} IPv{family}: "
                    + ("allowed" if ok else "denied")
                )
            if res.why:
                print(f"why: {res.why}")
            return 0 if all(res.allowed.values()) else 3
    except (Unavailable, LocalApiError) as exc:
        print(f"np-sandbox: {exc}", file=sys.stderr)
        return 1
    return 0


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
