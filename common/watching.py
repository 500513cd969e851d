"""List, then watch from the listed resourceVersion; re-list on 410; back off on failures.

The consumer sees a full state after every (re)list, in pages (so it can drop what
vanished while it was not watching, without holding the whole list at once), and each
change after that (:meth:`WatchConsumer.apply`). API trouble never ends the loop: a 410
re-lists at once, anything else (disconnects, timeouts, 5xx, refused connections)
retries with exponential backoff and jitter, from the last version seen when possible.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from common.kube import GoneError, KubeClient, KubeError, Obj, Resource, WatchEvent

log = structlog.get_logger("watch")


class WatchConsumer(Protocol):
    """A full state arrives as ``begin``, ``add`` for each object (page by page: the
    consumer can compact each object at once, so a large list never sits in memory
    whole), then ``end`` (drop what was not added); then each change as ``apply``.
    A list that fails midway is started again with ``begin``."""

    def begin(self) -> None: ...
    def add(self, obj: Obj) -> None: ...
    def end(self) -> None: ...
    def apply(self, event: WatchEvent) -> None: ...


class Replacing:
    """For consumers that want the whole state at once: collects the pages, then calls
    ``replace(items)``."""

    _items: list[Obj]

    def begin(self) -> None:
        self._items = []

    def add(self, obj: Obj) -> None:
        self._items.append(obj)

    def end(self) -> None:
        items, self._items = self._items, []
        self.replace(items)

    def replace(self, items: list[Obj]) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class WatchSettings:
    backoff_initial: float = 0.2
    """Seconds before the first retry after a failure."""
    backoff_max: float = 10.0
    """Cap of the exponential backoff, seconds."""
    server_timeout: int = 300
    """``timeoutSeconds`` asked of the server: it ends each watch after this long."""
    idle_timeout: float = 90.0
    """Seconds without any line (bookmarks included) before the watch is presumed dead."""
    page_size: int = 100
    """Objects per list page (client-go lists 500; PolicyEndpoints are large)."""


@dataclass
class WatchStats:
    lists: int = 0
    watches: int = 0
    gone: int = 0
    errors: int = 0
    events: int = 0
    last_error: str = ""
    synced: asyncio.Event = field(default_factory=asyncio.Event)


async def list_watch(
    client: KubeClient,
    resource: Resource,
    consumer: WatchConsumer,
    *,
    field_selector: str | None = None,
    label_selector: str | None = None,
    settings: WatchSettings = WatchSettings(),
    stats: WatchStats | None = None,
) -> None:
    """Run forever (until cancelled)."""
    stats = stats or WatchStats()
    rv: str | None = None
    backoff = settings.backoff_initial
    what = resource.plural
    while True:
        try:
            if rv is None:
                rv, count = await _list(client, resource, consumer, settings=settings,
                                        label_selector=label_selector,
                                        field_selector=field_selector)
                stats.lists += 1
                stats.synced.set()
                log.info("watch.listed", resource=what, items=count, resource_version=rv)
            stats.watches += 1
            async for ev in client.watch(resource, resource_version=rv,
                                         label_selector=label_selector,
                                         field_selector=field_selector,
                                         timeout_seconds=settings.server_timeout,
                                         idle_timeout=settings.idle_timeout):
                rv = _version(ev.object) or rv
                backoff = settings.backoff_initial
                if ev.type == "BOOKMARK":
                    continue
                stats.events += 1
                consumer.apply(ev)
        except GoneError:
            stats.gone += 1
            log.info("watch.gone", resource=what, resource_version=rv)
            rv = None
        except KubeError as exc:
            stats.errors += 1
            stats.last_error = str(exc)
            delay = backoff * random.uniform(0.5, 1.5)
            log.warning("watch.failed", resource=what, status=exc.status, error=str(exc)[:300],
                        retry_in=round(delay, 3))
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, settings.backoff_max)


async def _list(client: KubeClient, resource: Resource, consumer: WatchConsumer, *,
                settings: WatchSettings, label_selector: str | None,
                field_selector: str | None) -> tuple[str, int]:
    """The full state, page by page, into the consumer: (resourceVersion, objects)."""
    consumer.begin()
    token, version, count = "", "", 0
    while True:
        items, page_version, token = await client.list_page(
            resource, limit=settings.page_size, continue_token=token,
            label_selector=label_selector, field_selector=field_selector)
        version = version or page_version
        for obj in items:
            consumer.add(obj)
        count += len(items)
        del items
        if not token:
            break
        await asyncio.sleep(0)  # let the rest of the process run between pages
    consumer.end()
    return version, count


def _version(obj: Obj) -> str | None:
    meta = obj.get("metadata") or {}
    rv = meta.get("resourceVersion")
    return str(rv) if rv else None
