"""A fake Kubernetes API server speaking the real HTTP protocol (aiohttp).

Serves list (with resourceVersion; ``limit``/``continue`` pages; metadata only, as a
PartialObjectMetadataList, when the Accept header asks for it), watch (JSON lines, from
a resourceVersion, with bookmarks, ``timeoutSeconds``, 410 Gone for compacted
versions), get, create (incl. ``generateName``), update (optimistic concurrency), merge
patch and delete, with label and field selectors, for the resources in
:mod:`fakekube.store`. Clients reach it through
an ordinary kubeconfig (:meth:`FakeKube.write_kubeconfig`).

Tests drive faults directly: :meth:`FakeKube.compact` (later watches from old versions
get 410), :meth:`FakeKube.drop_watches` (connections cut), :meth:`FakeKube.pause` /
:meth:`FakeKube.resume` (the server is unreachable, then back on the same address),
:meth:`FakeKube.inject` (raw bytes into live watch streams: garbage lines, wrong shapes,
oversized events) and :meth:`FakeKube.cut_watches_at` (every stream that reaches a
matching event breaks in the middle of it, each time, until cleared).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from aiohttp import web

from fakekube import discovery, patches, protobuf, schemas, tables
from fakekube.admission import admit
from fakekube.selectors import SelectorError
from fakekube.store import NAMESPACES, RESOURCES, ApiError, Obj, Resource, Store, Watcher

SocketFactory = Callable[[], socket.socket]


def _key(obj: Obj) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def _routes_for(r: Resource) -> tuple[str, str | None, str | None]:
    base = f"/api/{r.version}" if not r.group else f"/apis/{r.group}/{r.version}"
    if r.namespaced:
        return (
            f"{base}/{r.plural}",
            f"{base}/namespaces/{{namespace}}/{r.plural}",
            f"{base}/namespaces/{{namespace}}/{r.plural}/{{name}}",
        )
    return (f"{base}/{r.plural}", None, f"{base}/{r.plural}/{{name}}")


class FakeKube:
    def __init__(
        self,
        *,
        bookmark_interval: float = 1.0,
        history_limit: int = 100_000,
        admission: bool = False,
    ) -> None:
        self.store = Store(history_limit=history_limit)
        # validate what clients write, as the real server does (fakekube.admission); off,
        # tests can write what a lax or older server would have let through
        self.admission = admission
        if admission:
            schemas.load()  # the chart's CRD schemas, read now rather than in a request
        self.bookmark_interval = bookmark_interval
        self.requests: Counter[str] = Counter()  # "list pods", "watch policyendpoints", ...
        # tests: seconds each watch event of a resource (by plural) is held before it is
        # sent (a watch that lags behind the store)
        self.watch_delay: dict[str, float] = {}
        self._watch_tasks: set[asyncio.Task[Any]] = set()
        self._cut_at: dict[str, Callable[[Obj], bool]] = {}
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self._extra_sites: list[web.BaseSite] = []
        self._sock_factory: SocketFactory | None = None
        self.url = ""
        self.app = self._build()

    # ---- lifecycle --------------------------------------------------------------------
    def _build(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/version", self._version)
        app.router.add_get("/api", self._api)
        app.router.add_get("/apis", self._apis)
        app.router.add_get("/api/{version}", self._resource_list)
        app.router.add_get("/apis/{group}/{version}", self._resource_list)
        app.router.add_get("/openapi/v3", self._openapi_index)
        app.router.add_get("/openapi/v3/{path:.+}", self._openapi_document)
        for r in RESOURCES:
            collection, ns_collection, item = _routes_for(r)
            app.router.add_get(collection, self._collection(r))
            if ns_collection:
                app.router.add_get(ns_collection, self._collection(r))
                app.router.add_post(ns_collection, self._create(r))
            else:
                app.router.add_post(collection, self._create(r))
            if item:
                app.router.add_get(item, self._item_get(r))
                app.router.add_put(item, self._item_put(r, status=False))
                app.router.add_patch(item, self._item_patch(r))
                app.router.add_delete(item, self._item_delete(r))
                app.router.add_put(item + "/status", self._item_put(r, status=True))
        return app

    async def start(
        self, *, host: str = "127.0.0.1", port: int = 0, sock_factory: SocketFactory | None = None
    ) -> str:
        """Listen on ``host:port``, or on sockets from ``sock_factory`` (e.g. created in
        another network namespace; it must bind the same address on every call, as
        :meth:`resume` listens anew). Returns the server URL."""
        if sock_factory is None:
            bound = [port]

            def default_factory() -> socket.socket:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, bound[0]))
                bound[0] = s.getsockname()[1]  # resume() listens on the same port
                return s

            sock_factory = default_factory
        self._sock_factory = sock_factory
        self._runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()
        return self.url

    async def _listen(self) -> None:
        assert self._runner is not None
        assert self._sock_factory is not None
        sock = self._sock_factory()
        sock.listen(128)
        sock.setblocking(False)
        addr = sock.getsockname()
        self.url = f"http://{addr[0]}:{addr[1]}"
        self._site = web.SockSite(self._runner, sock)
        await self._site.start()

    async def listen_also(self, sock: socket.socket) -> str:
        """Serve on one more listening socket too (e.g. the host's loopback while the
        main one is in a node's namespace); returns its URL."""
        assert self._runner is not None
        sock.listen(128)
        sock.setblocking(False)
        site = web.SockSite(self._runner, sock)
        await site.start()
        self._extra_sites.append(site)
        addr = sock.getsockname()
        return f"http://{addr[0]}:{addr[1]}"

    async def stop(self) -> None:
        await self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def write_kubeconfig(self, path: str, *, url: str = "") -> None:
        """A kubeconfig for this server (at ``url``, default the main socket's)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": url or self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }
        with open(path, "w") as f:
            json.dump(config, f)

    # ---- faults -----------------------------------------------------------------------
    def compact(self) -> None:
        self.store.compact()

    async def drop_watches(self) -> None:
        tasks = list(self._watch_tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    async def pause(self) -> None:
        """Become unreachable: cut watches, stop listening (connections refused) and
        close every open connection (keep-alive ones included)."""
        await self.drop_watches()
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for conn in list(self._runner.server.connections):
                conn.force_close()

    async def resume(self) -> None:
        if self._site is None:
            await self._listen()

    def inject(self, plural: str, raw: bytes) -> int:
        """Write ``raw`` (sent as is: end it with a newline) into every live watch of
        ``plural``; returns how many streams got it."""
        n = 0
        for t in self._watch_tasks:
            w = getattr(t, "watcher", None)
            if isinstance(w, Watcher) and w.resource.plural == plural:
                w.queue.put_nowait({RAW: raw})
                n += 1
        return n

    def cut_watches_at(self, plural: str, match: Callable[[Obj], bool] | None) -> None:
        """Every watch of ``plural`` that is about to send an event whose object matches
        breaks off in the middle of that event (None: clear)."""
        if match is None:
            self._cut_at.pop(plural, None)
        else:
            self._cut_at[plural] = match

    def send_bookmarks(self) -> None:
        for t in self._watch_tasks:
            w = getattr(t, "watcher", None)
            if isinstance(w, Watcher):
                w.queue.put_nowait(self._bookmark(w.resource))

    # ---- handlers ---------------------------------------------------------------------
    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"major": "1", "minor": "31", "gitVersion": "v1.31.0-fake"})

    async def _api(self, request: web.Request) -> web.Response:
        return web.json_response(discovery.api_versions(request.host))

    async def _apis(self, request: web.Request) -> web.Response:
        return web.json_response(discovery.api_group_list(RESOURCES))

    async def _resource_list(self, request: web.Request) -> web.Response:
        group = request.match_info.get("group", "")
        doc = discovery.api_resource_list(group, request.match_info["version"], RESOURCES)
        return web.json_response(doc) if doc is not None else _error(NOT_SERVED)

    async def _openapi_index(self, request: web.Request) -> web.Response:
        return web.json_response(discovery.openapi_v3_index(RESOURCES))

    async def _openapi_document(self, request: web.Request) -> web.Response:
        doc = discovery.openapi_v3_document_at(request.match_info["path"], RESOURCES)
        return web.json_response(doc) if doc is not None else _error(NOT_SERVED)

    def _admit(self, r: Resource, obj: Obj, request: web.Request) -> None:
        """The admission checks, when on (ApiError if refused)."""
        if not self.admission:
            return
        admit(r, obj, strict=request.query.get("fieldValidation") == "Strict")
        ns = request.match_info.get("namespace") or (obj.get("metadata") or {}).get("namespace")
        if r.namespaced and ns and (("", ns) not in self.store.objects[NAMESPACES]):
            raise ApiError(
                404,
                "NotFound",
                f'namespaces "{ns}" not found',
                details={"name": ns, "kind": "namespaces"},
            )

    def _bookmark(self, r: Resource) -> Obj:
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": r.kind,
                "apiVersion": r.api_version,
                "metadata": {"resourceVersion": str(self.store.rv)},
            },
        }

    def _collection(self, r: Resource) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            q = request.query
            ns = request.match_info.get("namespace")
            labels, fields = q.get("labelSelector"), q.get("fieldSelector")
            try:
                if q.get("watch") in ("1", "true"):
                    return await self._watch(request, r, ns, labels, fields)
                self.requests[f"list {r.plural}"] += 1
                metadata_only = "as=PartialObjectMetadataList" in request.headers.get("Accept", "")
                limit, first_rv, after = self._continue(q)
                items, rv = self.store.list(
                    r,
                    namespace=ns,
                    labels=labels,
                    fields=fields,
                    metadata_only=metadata_only,
                    after=after,
                    limit=limit,
                    copies=False,  # encoded below, before this handler yields
                )
                rv = first_rv or rv
                token = ""
                if limit and len(items) > limit:
                    items = items[:limit]
                    state = {"rv": rv, "after": list(_key(items[-1]))}
                    token = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
            except SelectorError as exc:
                return _error(ApiError(400, "BadRequest", str(exc)))
            except ApiError as exc:
                return _error(exc)
            meta: Obj = {"resourceVersion": str(rv)}
            if token:
                meta["continue"] = token
            if tables.wants_table(request.headers.get("Accept", "")):
                return web.json_response(
                    tables.table(
                        r,
                        items,
                        resource_version=str(rv),
                        include_object=q.get("includeObject", "Metadata"),
                    )
                )
            if metadata_only:
                return web.json_response(
                    {
                        "kind": "PartialObjectMetadataList",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": meta,
                        "items": [
                            {
                                "kind": "PartialObjectMetadata",
                                "apiVersion": "meta.k8s.io/v1",
                                "metadata": o["metadata"],
                            }
                            for o in items
                        ],
                    }
                )
            return web.json_response(
                {
                    "kind": f"{r.kind}List",
                    "apiVersion": r.api_version,
                    "metadata": meta,
                    "items": items,
                }
            )

        return handler

    def _continue(self, q: Mapping[str, str]) -> tuple[int, int, tuple[str, str] | None]:
        """``limit``/``continue`` pagination: (limit, the first page's version or 0, last
        key served). Every page reports the first page's version, so a watch from it
        replays what changed meanwhile; a token expires when that version is compacted
        (410)."""
        limit = int(q.get("limit", "0") or 0)
        token = q.get("continue", "")
        if not token:
            return limit, 0, None
        try:
            state = json.loads(base64.urlsafe_b64decode(token.encode()))
            rv, after = int(state["rv"]), (str(state["after"][0]), str(state["after"][1]))
        except (ValueError, KeyError, TypeError, IndexError):
            raise ApiError(400, "BadRequest", "invalid continue token") from None
        if rv < self.store.oldest_rv - 1:
            raise ApiError(
                410,
                "Expired",
                "The provided continue parameter is too old to display a "
                "consistent list result. You can start a new list without "
                "the continue parameter.",
            )
        return limit, rv, after

    async def _watch(
        self,
        request: web.Request,
        r: Resource,
        ns: str | None,
        labels: str | None,
        fields: str | None,
    ) -> web.StreamResponse:
        self.requests[f"watch {r.plural}"] += 1
        q = request.query
        watcher = Watcher(r, ns, labels, fields)
        try:
            backlog = self._backlog(r, ns, labels, fields, q.get("resourceVersion", ""))
        except ApiError as exc:
            if exc.code != 410:
                return _error(exc)
            resp = await self._stream_start(request)
            await _send(resp, {"type": "ERROR", "object": exc.status()})
            return resp
        self.store.watchers.add(watcher)
        resp = await self._stream_start(request)
        task = asyncio.current_task()
        assert task is not None
        task.watcher = watcher  # type: ignore[attr-defined]
        self._watch_tasks.add(task)
        try:
            await self._stream(
                request,
                resp,
                watcher,
                backlog,
                bookmarks=q.get("allowWatchBookmarks") in ("1", "true"),
                timeout=float(q.get("timeoutSeconds", "0") or 0),
                table=(
                    q.get("includeObject", "Metadata")
                    if tables.wants_table(request.headers.get("Accept", ""))
                    else None
                ),
            )
        except asyncio.CancelledError:
            # a dropped watch: close the transport so the client sees the cut
            if request.transport is not None:
                request.transport.abort()
            raise
        except ConnectionError:
            pass  # the client went away
        finally:
            self.store.watchers.discard(watcher)
            self._watch_tasks.discard(task)
        return resp

    def _backlog(
        self, r: Resource, ns: str | None, labels: str | None, fields: str | None, rv: str
    ) -> list[Obj]:
        """What a watch from ``rv`` sends first: every object (from "" or "0"), or the
        events since ``rv`` that match (ApiError 410 if they are compacted away)."""
        if rv in ("", "0"):
            items, _ = self.store.list(r, namespace=ns, labels=labels, fields=fields)
            return [{"type": "ADDED", "object": o} for o in items]
        probe = Watcher(r, ns, labels, fields)
        for ev in self.store.events_since(r, int(rv)):
            probe.offer(ev)
        backlog = []
        while not probe.queue.empty():
            item = probe.queue.get_nowait()
            if item is not None:
                backlog.append(item)
        return backlog

    async def _stream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        watcher: Watcher,
        backlog: list[Obj],
        *,
        bookmarks: bool,
        timeout: float,
        table: str | None = None,
    ) -> None:
        """The backlog, then each event as it comes, until the timeout or a cut; each
        object as a one-row Table if ``table`` (its includeObject) is given."""
        r = watcher.resource
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout > 0 else None
        for item in backlog:
            if await self._maybe_cut(request, resp, r.plural, item):
                return
            await self._send_event(resp, r, item, table)
        while True:
            wait = self.bookmark_interval if bookmarks else 3600.0
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    return
            try:
                next_item: Obj | None = await asyncio.wait_for(watcher.queue.get(), wait)
            except TimeoutError:
                if bookmarks:
                    await _send(resp, self._bookmark(r))
                continue
            if next_item is None:
                return
            item = next_item
            if item.get("type") == "BOOKMARK" and not bookmarks:
                continue
            if await self._maybe_cut(request, resp, r.plural, item):
                return
            await self._send_event(resp, r, item, table)

    async def _send_event(
        self, resp: web.StreamResponse, r: Resource, item: Obj, table: str | None = None
    ) -> None:
        delay = self.watch_delay.get(r.plural, 0.0)
        if delay and item.get("type") != "BOOKMARK":
            await asyncio.sleep(delay)
        obj = item.get("object")
        if table is not None and item.get("type") != "BOOKMARK" and isinstance(obj, dict):
            rv = str((obj.get("metadata") or {}).get("resourceVersion", ""))
            item = {
                "type": item["type"],
                "object": tables.table(r, [obj], resource_version=rv, include_object=table),
            }
        await _send(resp, item)

    async def _maybe_cut(
        self, request: web.Request, resp: web.StreamResponse, plural: str, item: Obj
    ) -> bool:
        match = self._cut_at.get(plural)
        obj = item.get("object")
        if match is None or not isinstance(obj, dict) or not match(obj):
            return False
        data = json.dumps(item).encode()
        await resp.write(data[: len(data) // 2])
        if request.transport is not None:
            request.transport.abort()
        return True

    async def _stream_start(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        return resp

    def _create(self, r: Resource) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            self.requests[f"create {r.plural}"] += 1
            try:
                body = await _body(request)
                self._admit(r, body, request)
                obj = self.store.create(
                    r, request.match_info.get("namespace"), body, dry_run=_dry_run(request)
                )
            except ApiError as exc:
                return _error(exc)
            return web.json_response(obj, status=201)

        return handler

    def _item_get(self, r: Resource) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            self.requests[f"get {r.plural}"] += 1
            try:
                obj = self.store.get(
                    r, request.match_info.get("namespace", ""), request.match_info["name"]
                )
            except ApiError as exc:
                return _error(exc)
            if tables.wants_table(request.headers.get("Accept", "")):
                return web.json_response(
                    tables.table(
                        r, [obj], include_object=request.query.get("includeObject", "Metadata")
                    )
                )
            return web.json_response(obj)

        return handler

    def _item_put(self, r: Resource, *, status: bool) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            self.requests[f"update {r.plural}"] += 1
            try:
                body = await _body(request)
                if not status:
                    self._admit(r, body, request)
                obj = self.store.update(
                    r,
                    request.match_info.get("namespace", ""),
                    request.match_info["name"],
                    body,
                    status_only=status,
                    dry_run=_dry_run(request),
                )
            except ApiError as exc:
                return _error(exc)
            return web.json_response(obj)

        return handler

    def _item_patch(self, r: Resource) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            self.requests[f"patch {r.plural}"] += 1
            ctype = request.content_type
            apply = _PATCHES.get(ctype, ...)
            if apply is ...:
                return _error(
                    ApiError(415, "UnsupportedMediaType", f"patch type {ctype} is not supported")
                )
            ns, name = request.match_info.get("namespace", ""), request.match_info["name"]
            try:
                body = await _body(request, yaml_ok=ctype == APPLY_PATCH)
                if ctype == APPLY_PATCH:
                    return await self._apply(request, r, ns, name, body)
                obj = self.store.patch(
                    r,
                    ns,
                    name,
                    body,
                    apply=apply,
                    admit=lambda o: self._admit(r, o, request),
                    dry_run=_dry_run(request),
                )
            except ApiError as exc:
                return _error(exc)
            return web.json_response(obj)

        return handler

    async def _apply(
        self, request: web.Request, r: Resource, ns: str, name: str, applied: Any
    ) -> web.Response:
        """Server-side apply: creates the object if absent (201), else patches it."""
        manager = request.query.get("fieldManager", "")
        if not manager:
            raise ApiError(422, "Invalid", "PATCH requests of the apply type need a fieldManager")
        if not isinstance(applied, dict):
            raise ApiError(400, "BadRequest", "the applied configuration is not an object")
        meta = applied.get("metadata")
        if isinstance(meta, dict) and meta.get("name") not in (None, name):
            raise ApiError(400, "BadRequest", "the name of the body and the path differ")
        try:
            self.store.get(r, ns, name)
        except ApiError as exc:
            if exc.code != 404:
                raise
            body = patches.server_side_apply(None, applied, manager)
            body.setdefault("metadata", {}).setdefault("name", name)
            self._admit(r, body, request)
            created = self.store.create(r, ns or None, body, dry_run=_dry_run(request))
            return web.json_response(created, status=201)
        obj = self.store.patch(
            r,
            ns,
            name,
            applied,
            apply=lambda current, patch: patches.server_side_apply(current, patch, manager),
            admit=lambda o: self._admit(r, o, request),
            dry_run=_dry_run(request),
        )
        return web.json_response(obj)

    def _item_delete(self, r: Resource) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            self.requests[f"delete {r.plural}"] += 1
            try:
                obj = self.store.delete(
                    r, request.match_info.get("namespace", ""), request.match_info["name"]
                )
            except ApiError as exc:
                return _error(exc)
            return web.json_response(obj)

        return handler


RAW = "__raw__"  # a queued item written as is (FakeKube.inject)
NOT_SERVED = ApiError(404, "NotFound", "the server could not find the requested resource")
APPLY_PATCH = "application/apply-patch+yaml"
# patch content type -> how it applies (None: JSON merge patch, the store's own)
_PATCHES: dict[str, Callable[[Obj, Any], Obj] | None] = {
    "application/merge-patch+json": None,
    "application/strategic-merge-patch+json": patches.strategic_merge,
    "application/json-patch+json": patches.json_patch,
    APPLY_PATCH: None,
}


async def _body(request: web.Request, *, yaml_ok: bool = False) -> Any:
    """The request's body: JSON (or YAML, for an apply patch; protobuf for the kinds
    :mod:`fakekube.protobuf` reads)."""
    if request.content_type == "application/vnd.kubernetes.protobuf":
        return protobuf.decode(await request.read())
    text = await request.text()
    try:
        return yaml.safe_load(text) if yaml_ok else json.loads(text)
    except (ValueError, yaml.YAMLError):
        raise ApiError(
            400, "BadRequest", "the body is not valid JSON" + (" or YAML" if yaml_ok else "")
        ) from None


def _dry_run(request: web.Request) -> bool:
    return request.query.get("dryRun") == "All"


async def _send(resp: web.StreamResponse, item: Obj) -> None:
    raw = item.get(RAW)
    await resp.write(raw if isinstance(raw, bytes) else json.dumps(item).encode() + b"\n")


def _error(exc: ApiError) -> web.Response:
    return web.json_response(exc.status(), status=exc.code)
