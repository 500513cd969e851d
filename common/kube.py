"""Typed adapter over kubernetes-asyncio: the only module importing it.

The library provides configuration (kubeconfig or in-cluster), authentication and the
HTTP session; requests are made on raw paths with plain dicts (TypedDict-shaped until a
caller validates them), so that one adapter serves the core, networking and CRD groups
and watches can be streamed line by line.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import aiohttp
import orjson


def _import_lean() -> tuple[ModuleType, ModuleType]:
    """kubernetes_asyncio's package ``__init__`` imports every API and model class it
    has: about 35 MB resident in each process that imports it. This adapter uses only
    the configuration, the config loaders and ``ApiClient.call_api`` with raw responses
    (``_preload_content=False``: no model is ever deserialized), so it loads those
    modules alone: the packages are registered with their real paths but without
    running their ``__init__``, and ``client.models`` is an empty module. If something
    imported the library fully already, that import is used as is."""
    if "kubernetes_asyncio" in sys.modules:
        import kubernetes_asyncio.client
        import kubernetes_asyncio.config

        return kubernetes_asyncio.client, kubernetes_asyncio.config
    spec = importlib.util.find_spec("kubernetes_asyncio")
    if spec is None or spec.origin is None:
        raise ImportError("kubernetes_asyncio is not installed")
    root = os.path.dirname(spec.origin)

    def package(name: str, path: str) -> ModuleType:
        module = ModuleType(name)
        module.__path__ = [path]
        module.__package__ = name
        sys.modules[name] = module
        return module

    top = package("kubernetes_asyncio", root)
    client = package("kubernetes_asyncio.client", os.path.join(root, "client"))
    models = ModuleType("kubernetes_asyncio.client.models")
    sys.modules[models.__name__] = models
    top.client, client.models = client, models  # type: ignore[attr-defined]
    configuration = importlib.import_module("kubernetes_asyncio.client.configuration")
    api_client = importlib.import_module("kubernetes_asyncio.client.api_client")
    client.Configuration = configuration.Configuration  # type: ignore[attr-defined]
    client.ApiClient = api_client.ApiClient  # type: ignore[attr-defined]
    config = importlib.import_module("kubernetes_asyncio.config")
    top.config = config  # type: ignore[attr-defined]
    return client, config


k8s_client, k8s_config = _import_lean()
ApiException = importlib.import_module("kubernetes_asyncio.client.exceptions").ApiException

Obj = dict[str, Any]
# server-side metadata-only lists (every resource, custom ones included)
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


@dataclass(frozen=True)
class Resource:
    group: str  # "" for core
    version: str
    plural: str
    namespaced: bool

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if namespace and self.namespaced:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        return base


PODS = Resource("", "v1", "pods", True)
NAMESPACES = Resource("", "v1", "namespaces", False)
SERVICES = Resource("", "v1", "services", True)
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", True)
POLICY_ENDPOINTS = Resource("networking.k8s.aws", "v1alpha1", "policyendpoints", True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", True)
APPLICATION_NETWORK_POLICIES = Resource(
    "networking.k8s.aws", "v1alpha1", "applicationnetworkpolicies", True
)
CLUSTER_NETWORK_POLICIES = Resource(
    "networking.k8s.aws", "v1alpha1", "clusternetworkpolicies", False
)
CLUSTER_POLICY_ENDPOINTS = Resource(
    "networking.k8s.aws", "v1alpha1", "clusterpolicyendpoints", False
)


class KubeError(Exception):
    """An API request failed. ``status`` is the HTTP status (0: no response)."""

    def __init__(self, status: int, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class GoneError(KubeError):
    """410: the resourceVersion is too old; list again."""


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK | MALFORMED (see ``problem``)
    object: Obj
    problem: str = ""  # MALFORMED: what was wrong (bounded); the line is skipped
    oversized: bool = False  # MALFORMED because it exceeded MAX_EVENT_BYTES


EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})
# A watch line longer than this is skipped (and the caller lists again to learn the
# object): the API server's own limit on an object is about 1.5 MiB (etcd's request size),
# so only a broken or hostile peer sends more, and it must not make us hold it.
MAX_EVENT_BYTES = 8 * 2**20
_CHUNK = 2**16


def parse_event(line: bytes) -> WatchEvent:
    """One watch line, validated at the edge: a JSON object whose ``type`` is known and
    whose ``object`` is an object with an object ``metadata`` (a Status for ERROR).
    Anything else is a MALFORMED event naming the problem (never an exception)."""
    try:
        event = orjson.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        return _malformed(f"not JSON ({exc.__class__.__name__}): {_excerpt(line)}")
    if not isinstance(event, dict):
        return _malformed(f"event is a {type(event).__name__}, not an object")
    etype, obj = event.get("type"), event.get("object")
    if etype not in EVENT_TYPES:
        return _malformed(f"unknown event type {_excerpt(str(etype).encode())}")
    if not isinstance(obj, dict):
        return _malformed(f"{etype} event's object is a {type(obj).__name__}")
    if etype != "ERROR" and not isinstance(obj.get("metadata") or {}, dict):
        return _malformed(f"{etype} event's metadata is a {type(obj.get('metadata')).__name__}")
    return WatchEvent(etype, obj)


def _malformed(problem: str, *, oversized: bool = False) -> WatchEvent:
    return WatchEvent("MALFORMED", {}, problem=problem, oversized=oversized)


def _excerpt(raw: bytes, limit: int = 120) -> str:
    text = raw[:limit].decode(errors="replace").strip()
    return f"{text!r}" + (f" ... ({len(raw)} bytes)" if len(raw) > limit else "")


async def _lines(content: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes | int]:
    """Lines of a stream (without the newline); a line over ``limit`` bytes is not held:
    its length is yielded instead, once it ends."""
    buf = bytearray()
    skipping = 0  # bytes of an oversized line discarded so far
    while True:
        chunk = await content.readany()
        if not chunk:
            if skipping:
                yield skipping
            elif buf.strip():
                yield bytes(buf)
            return
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                piece = chunk[start:]
                if skipping:
                    skipping += len(piece)
                elif len(buf) + len(piece) > limit:
                    skipping = len(buf) + len(piece)
                    buf = bytearray()
                else:
                    buf += piece
                break
            piece = chunk[start:nl]
            start = nl + 1
            if skipping:
                yield skipping + len(piece)
                skipping = 0
            elif len(buf) + len(piece) > limit:
                yield len(buf) + len(piece)
                buf = bytearray()
            else:
                buf += piece
                line, buf = bytes(buf), bytearray()
                yield line


class KubeClient:
    def __init__(self, api: Any) -> None:
        self._api = api  # a kubernetes_asyncio ApiClient

    @classmethod
    async def connect(cls, kubeconfig: str | None = None) -> KubeClient:
        """From a kubeconfig file, or the in-cluster service account when None."""
        cfg = k8s_client.Configuration()
        if kubeconfig:
            await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            k8s_config.load_incluster_config(client_configuration=cfg)
        return cls(k8s_client.ApiClient(configuration=cfg))

    async def close(self) -> None:
        await self._api.close()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        timeout: float | aiohttp.ClientTimeout | None = 30.0,
    ) -> Any:
        try:
            resp = await self._api.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params={"Accept": accept, "Content-Type": content_type},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except ApiException as exc:  # raised for >= 400 statuses
            body = exc.body or exc.reason or ""
            text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
            raise _error(exc.status or 0, text) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise KubeError(0, f"{method} {path}: {exc!r}") from exc
        return resp

    async def _json(self, method: str, path: str, **kw: Any) -> Obj:
        resp = await self._call(method, path, **kw)
        try:
            data = await resp.read()
        finally:
            resp.release()
        if resp.status >= 400:
            raise _error(resp.status, data.decode(errors="replace"))
        result: Obj = orjson.loads(data)  # lists of thousands of objects: C, not Python
        return result

    # ---- verbs ------------------------------------------------------------------------
    async def list(
        self,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[Obj], str]:
        """Items and the list's resourceVersion (to watch from)."""
        query = _selectors(label_selector, field_selector)
        data = await self._json("GET", resource.path(namespace), query=query)
        return list(data.get("items") or []), str(data["metadata"]["resourceVersion"])

    async def list_page(
        self,
        resource: Resource,
        *,
        limit: int,
        continue_token: str = "",
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[builtins.list[Obj], str, str]:
        """One page of at most ``limit`` items: (items, resourceVersion, continue token;
        empty on the last page). Every page of one list has the first page's version. A
        continue token that expired raises GoneError: list again from the start."""
        query = _selectors(label_selector, field_selector)
        query["limit"] = str(limit)
        if continue_token:
            query["continue"] = continue_token
        data = await self._json("GET", resource.path(namespace), query=query)
        meta = data.get("metadata") or {}
        return (
            list(data.get("items") or []),
            str(meta.get("resourceVersion", "")),
            str(meta.get("continue") or ""),
        )

    async def list_metadata(
        self, resource: Resource, *, namespace: str | None = None
    ) -> tuple[builtins.list[Obj], str]:
        """Items' metadata only (a PartialObjectMetadataList): names, generations and
        versions without the specs, whatever their size."""
        data = await self._json("GET", resource.path(namespace), accept=METADATA_ONLY)
        return list(data.get("items") or []), str(data["metadata"]["resourceVersion"])

    async def collection_version(self, resource: Resource) -> str:
        """The API server's current resourceVersion, from a list of at most one item's
        metadata (cheap whatever the collection's size): a watch whose view has reached
        it has delivered every change made before the call."""
        data = await self._json(
            "GET", resource.path(None), query={"limit": "1"}, accept=METADATA_ONLY
        )
        return str(data["metadata"]["resourceVersion"])

    async def get(self, resource: Resource, namespace: str | None, name: str) -> Obj:
        return await self._json("GET", resource.path(namespace, name))

    async def create(self, resource: Resource, namespace: str | None, body: Obj) -> Obj:
        return await self._json("POST", resource.path(namespace), body=body)

    async def replace(self, resource: Resource, namespace: str | None, name: str, body: Obj) -> Obj:
        return await self._json("PUT", resource.path(namespace, name), body=body)

    async def patch(self, resource: Resource, namespace: str | None, name: str, patch: Obj) -> Obj:
        return await self._json(
            "PATCH",
            resource.path(namespace, name),
            body=patch,
            content_type="application/merge-patch+json",
        )

    async def delete(self, resource: Resource, namespace: str | None, name: str) -> Obj:
        return await self._json("DELETE", resource.path(namespace, name))

    async def watch(
        self,
        resource: Resource,
        *,
        resource_version: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_seconds: int = 300,
        idle_timeout: float = 90.0,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> AsyncIterator[WatchEvent]:
        """Stream events after ``resource_version`` (bookmarks included). Ends when the
        server closes the watch; raises :class:`GoneError` on 410, :class:`KubeError` on any
        other failure, including ``idle_timeout`` seconds of silence. A line that is not a
        well-formed event (garbage, a wrong shape, over ``max_event_bytes``) is yielded as
        a MALFORMED event, never raised."""
        query = _selectors(label_selector, field_selector)
        query.update(
            watch="1",
            resourceVersion=resource_version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(timeout_seconds),
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=idle_timeout)
        resp = await self._call("GET", resource.path(namespace), query=query, timeout=timeout)
        try:
            if resp.status >= 400:
                raise _error(resp.status, (await resp.read()).decode(errors="replace"))
            lines = _lines(resp.content, max_event_bytes)
            while True:
                try:
                    line = await anext(lines)
                except StopAsyncIteration:
                    return
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    raise KubeError(0, f"watch {resource.plural}: {exc!r}") from exc
                if isinstance(line, int):
                    yield _malformed(
                        f"event of {line} bytes, over the {max_event_bytes} byte bound",
                        oversized=True,
                    )
                    continue
                if not line.strip():
                    continue
                event = parse_event(line)
                if event.type == "ERROR":
                    obj = event.object
                    code = obj.get("code")
                    raise _error(
                        code if isinstance(code, int) else 500,
                        str(obj.get("message", ""))[:300],
                        reason=str(obj.get("reason", ""))[:100],
                    )
                yield event
        finally:
            resp.release()
            resp.close()


def _selectors(label_selector: str | None, field_selector: str | None) -> dict[str, str]:
    query = {}
    if label_selector:
        query["labelSelector"] = label_selector
    if field_selector:
        query["fieldSelector"] = field_selector
    return query


def _error(status: int, body: str, *, reason: str = "") -> KubeError:
    message = body
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            message = parsed.get("message", body)
            reason = reason or parsed.get("reason", "")
    except (json.JSONDecodeError, TypeError):
        pass
    cls = GoneError if status == 410 else KubeError
    return cls(status, message, reason=reason)
