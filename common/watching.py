"""List, then watch from the listed resourceVersion; re-list on 410; back off on failures.

The consumer sees a full state after every (re)list, in pages (so it can drop what
vanished while it was not watching, without holding the whole list at once), and each
change after that (:meth:`WatchConsumer.apply`). API trouble never ends the loop: a 410
re-lists at once, anything else (disconnects, timeouts, 5xx, refused connections)
retries with exponential backoff and jitter, from the last version seen when possible.

The API server is a peer we do not control. A malformed event (not JSON, a wrong shape,
over the size bound) is skipped, logged and counted; an object the consumer cannot take
is skipped the same way, and every other object still is. ``RELIST_AFTER`` failures in a
row at one resourceVersion (a stream that always breaks at the same event) re-list, as
does an oversized event (its object is learned from the list). A watch that has failed
without progress for ``stall_after`` seconds is reported by :meth:`WatchStats.stalled`
(the processes' readiness).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    relist_after: int = 3
    """Failures in a row at one resourceVersion before listing again."""
    stall_after: float = 60.0
    """Seconds of failures without progress before the watch is reported stalled."""


@dataclass
class WatchStats:
    lists: int = 0
    watches: int = 0
    gone: int = 0
    errors: int = 0
    events: int = 0
    malformed: int = 0  # events skipped: not a well-formed event
    rejected: int = 0  # objects the consumer could not take (skipped)
    relists: int = 0  # lists forced by repeated failures or an oversized event
    last_error: str = ""
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    progress_at: float = field(default_factory=time.monotonic)  # list, event, clean end
    failing_since: float | None = None  # first failure since the last progress

    def progressed(self) -> None:
        self.progress_at = time.monotonic()
        self.failing_since = None

    def failed(self, error: str) -> None:
        self.errors += 1
        self.last_error = error[:300]
        if self.failing_since is None:
            self.failing_since = time.monotonic()

    def stalled(self, bound: float) -> float:
        """Seconds the watch has been failing without progress, if over ``bound``
        (else 0): a quiet but healthy watch is never stalled."""
        if self.failing_since is None:
            return 0.0
        stuck = time.monotonic() - self.progress_at
        return stuck if stuck > bound else 0.0


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
    failures_at: tuple[str | None, int] = (None, 0)  # (resourceVersion, failures in a row)

    def failure(error: str) -> bool:
        """Count a failure at the current version; True when it is time to list again."""
        nonlocal failures_at
        stats.failed(error)
        same = failures_at[0] == rv
        failures_at = (rv, failures_at[1] + 1 if same else 1)
        return failures_at[1] >= settings.relist_after

    while True:
        try:
            if rv is None:
                rv, count = await _list(
                    client,
                    resource,
                    consumer,
                    settings=settings,
                    label_selector=label_selector,
                    field_selector=field_selector,
                    stats=stats,
                )
                stats.lists += 1
                stats.synced.set()
                stats.progressed()
                failures_at = (None, 0)
                log.info("watch.listed", resource=what, items=count, resource_version=rv)
            stats.watches += 1
            relist = ""
            async for ev in client.watch(
                resource,
                resource_version=rv,
                label_selector=label_selector,
                field_selector=field_selector,
                timeout_seconds=settings.server_timeout,
                idle_timeout=settings.idle_timeout,
            ):
                if ev.type == "MALFORMED":
                    stats.malformed += 1
                    log.warning(
                        "watch.malformed_event",
                        resource=what,
                        problem=ev.problem,
                        resource_version=rv,
                    )
                    if ev.oversized:
                        relist = "an event over the size bound was skipped"
                        break
                    if failure(f"malformed event: {ev.problem}"):
                        relist = f"{settings.relist_after} failures at one resourceVersion"
                        break
                    continue
                rv = _version(ev.object) or rv
                backoff = settings.backoff_initial
                stats.progressed()
                if ev.type == "BOOKMARK":
                    continue
                stats.events += 1
                _apply(consumer.apply, ev, ev.object, what=what, stats=stats)
            else:
                stats.progressed()  # the server ended the watch cleanly
            if relist:
                stats.relists += 1
                log.warning("watch.relisting", resource=what, reason=relist, resource_version=rv)
                rv = None
        except GoneError:
            stats.gone += 1
            log.info("watch.gone", resource=what, resource_version=rv)
            rv = None
        except KubeError as exc:
            again = failure(str(exc))
            delay = backoff * random.uniform(0.5, 1.5)
            log.warning(
                "watch.failed",
                resource=what,
                status=exc.status,
                error=str(exc)[:300],
                retry_in=round(delay, 3),
            )
            if again and rv is not None:
                stats.relists += 1
                log.warning(
                    "watch.relisting",
                    resource=what,
                    resource_version=rv,
                    reason=f"{settings.relist_after} failures at one resourceVersion",
                )
                rv = None
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, settings.backoff_max)


def _apply(fn: Callable[[Any], None], arg: Any, obj: Obj, *, what: str, stats: WatchStats) -> None:
    """Give one object to the consumer; one it cannot take is skipped, not fatal."""
    try:
        fn(arg)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as exc:
        stats.rejected += 1
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        name = (
            f"{meta.get('namespace', '')}/{meta.get('name', '')}" if isinstance(meta, dict) else "?"
        )
        log.error(
            "watch.object_skipped",
            resource=what,
            object=name[:200],
            error=f"{type(exc).__name__}: {str(exc)[:200]}",
        )


async def _list(
    client: KubeClient,
    resource: Resource,
    consumer: WatchConsumer,
    *,
    settings: WatchSettings,
    label_selector: str | None,
    field_selector: str | None,
    stats: WatchStats,
) -> tuple[str, int]:
    """The full state, page by page, into the consumer: (resourceVersion, objects)."""
    consumer.begin()
    token, version, count = "", "", 0
    while True:
        items, page_version, token = await client.list_page(
            resource,
            limit=settings.page_size,
            continue_token=token,
            label_selector=label_selector,
            field_selector=field_selector,
        )
        version = version or page_version
        for obj in items:
            if isinstance(obj, dict) and isinstance(obj.get("metadata") or {}, dict):
                _apply(consumer.add, obj, obj, what=resource.plural, stats=stats)
            else:
                stats.malformed += 1
                log.warning(
                    "watch.malformed_item",
                    resource=resource.plural,
                    problem=f"list item is a {type(obj).__name__}",
                )
        count += len(items)
        del items
        if not token:
            break
        await asyncio.sleep(0)  # let the rest of the process run between pages
    consumer.end()
    return version, count


def _version(obj: Obj) -> str | None:
    meta = obj.get("metadata") or {}
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return str(rv)[:64] if rv else None
