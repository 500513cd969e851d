"""The running np-sandbox (``np-sandbox up``, see :mod:`simnode.sandbox`): the demo's
simulated node, the fake API server also on the host's loopback for kubectl, the
control socket the helpers use, and the pods kubectl writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from common.localapi import LocalClient, Unavailable
from fakekube import store as fs
from fakekube.store import ApiError, Watcher
from simnode.demo import Demo, DemoPod, cancelled_by_signals
from simnode.node import SimPod
from simnode.sandboxapi import (
    CONTROL,
    NODE,
    STATE_DIR,
    AddPod,
    PodInfo,
    ProbeRequest,
    ProbeResult,
    Settled,
    Status,
    parse_port,
    parse_ref,
)


# ---- the running sandbox ------------------------------------------------------------------
class Sandbox:
    def __init__(self, *, state_dir: Path, color: bool) -> None:
        self.state_dir = state_dir
        self.demo = Demo(color=color, workdir=state_dir / "node", node=NODE, admission=True)
        self.kubeconfig = state_dir / "kubeconfig"
        self.control = state_dir / CONTROL
        self._runner: web.AppRunner | None = None
        self._lock = asyncio.Lock()  # one pod change at a time

    @property
    def store(self) -> fs.Store:
        return self.demo.stack.api.store

    async def start(self) -> None:
        await self.demo.setup()
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
        app.router.add_post("/v1/settle", self._settle)
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
        server = self.demo.servers.get(pod.name)
        return PodInfo(
            namespace=pod.namespace,
            name=pod.name,
            labels=pod.labels,
            ipv4=str(pod.ipv4),
            ipv6=str(pod.ipv6),
            host_veth=pod.host_veth,
            listen=[f"{p}/{proto}" for p, proto in server.listen] if server else [],
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
            taken = self.demo.sim.pods.get(name)  # wired, or being wired
            if taken is not None:
                raise ValueError(
                    f"a pod named {name} exists ({taken.namespace}/{name}): names are unique "
                    "across namespaces in the sandbox"
                )
            if written is None:
                self._ensure_namespace(namespace)
            pod, _ = await self.demo.add_pod(
                DemoPod(namespace, name, dict(labels), tuple(listen)), written=written
            )
            return pod

    async def remove_pod(self, namespace: str, name: str, *, delete_object: bool = True) -> None:
        async with self._lock:
            pod = self.demo.pods.get(name)
            if pod is None or pod.namespace != namespace:
                raise KeyError(f"{namespace}/{name}")
            await self.demo.remove_pod(name)
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

    async def _settle(self, request: web.Request) -> web.Response:
        """Wait until np-resolver has caught up with every change written so far and
        np-agent has programmed every pod."""
        try:
            timeout = float(request.query.get("timeout", "30"))
        except ValueError:
            return _fail(400, "timeout is a number of seconds")
        res = await self.demo.stack.settle(timeout=timeout)
        return web.json_response(
            text=Settled(programmed=res.programmed, pending=list(res.pending)).model_dump_json()
        )

    def _pod(self, ref: str) -> SimPod:
        ns, name = parse_ref(ref)
        pod = self.demo.pods.get(name)
        if pod is None or pod.namespace != ns:
            raise ValueError(f"no pod {ns}/{name} in the sandbox")
        return pod


def _fail(status: int, message: str) -> web.Response:
    return web.json_response({"error": message.splitlines()[0]}, status=status)


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is under it."""
    here = Path.cwd()
    return os.path.relpath(path, here) if path.is_relative_to(here) else str(path)


def _command(name: str) -> str:
    """How to run a command from the current directory: by name if it is on PATH, else
    by its path (scripts/ of this checkout, or this Python's environment: .venv/bin)."""
    if shutil.which(name):
        return name
    repo = Path(__file__).resolve().parents[1]
    path = repo / "scripts" / name
    if not path.exists():
        path = Path(sys.executable).parent / name
    return _shown(path)


def _intro(sandbox: Sandbox) -> str:
    shown = _shown(Path(__file__).resolve().parents[1] / "examples" / "walkthrough")
    run = sandbox.demo.stack.runtime_dir
    client = sandbox.demo.pods["client-one"].ipv4
    me = _command("np-sandbox") + (
        "" if str(sandbox.state_dir) == STATE_DIR else f" --state-dir {sandbox.state_dir}"
    )
    kubectl, cli = _command("kubectl"), _command("np-cli")
    return f"""
The sandbox is up. In another shell:

  export KUBECONFIG={sandbox.kubeconfig}
  {kubectl} get pods -A -o wide
  {kubectl} apply -f {shown}/01-deny-all-ingress.yaml
  {me} settle
  {me} probe default/client-one default/demo-app 80/TCP
  {cli} --runtime-dir {run} explain default/demo-app --peer {client} --port 80
  {kubectl} get policyendpoints -A -w
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
    follower: asyncio.Task[None] | None = None
    try:
        with cancelled_by_signals():
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
        if follower is not None and not follower.done():
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        await sandbox.close()
        if keep_logs:
            print(f"logs kept in {sandbox.demo.workdir}")
        else:
            shutil.rmtree(state_dir, ignore_errors=True)
        print("cleaned up: processes stopped; namespaces, veths and pins removed", flush=True)
