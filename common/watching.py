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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from common.kube import GoneError, KubeClient, KubeError, Obj, Resource, WatchEvent

log = structlog.get_logger("watch")


class ListConsumer(Protocol):
    """A full state arrives as ``begin``, ``add`` for each object (page by page: the
    consumer can compact each object at once, so a large list never sits in memory
    whole), then ``end`` (drop what was not added). A list that fails midway is started
    again with ``begin``."""

    def begin(self) -> None: ...
    def add(self, obj: Obj) -> None: ...
    def end(self) -> None: ...


class WatchConsumer(ListConsumer, Protocol):
    """A list's full state (:class:`ListConsumer`), then each change as ``apply``."""

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
    # the resourceVersion the consumer's view is at (list, events, bookmarks); "" while
    # unknown (before the first list, after a relist began)
    resource_version: str = ""
    served: bool = True  # False: an optional resource the API server does not serve
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
    optional: bool = False,
    ready: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Run forever (until cancelled). ``optional``: the resource may not be served (a
    CRD not installed): a 404 on the list counts as an empty, synced list, and the list
    is tried again every ``backoff_max`` seconds until the resource appears. ``ready``:
    what the consumer needs before it takes objects (see :func:`list_into`)."""
    loop = _Loop(
        client,
        resource,
        consumer,
        settings,
        stats or WatchStats(),
        label_selector=label_selector,
        field_selector=field_selector,
        optional=optional,
        ready=ready,
    )
    await loop.run()


class _Loop:
    """The state of one list-watch: the version reached and the failures at it."""

    def __init__(
        self,
        client: KubeClient,
        resource: Resource,
        consumer: WatchConsumer,
        settings: WatchSettings,
        stats: WatchStats,
        *,
        label_selector: str | None,
        field_selector: str | None,
        optional: bool = False,
        ready: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.optional = optional
        self.ready = ready
        self.absent = False
        self.client = client
        self.resource = resource
        self.consumer = consumer
        self.settings = settings
        self.stats = stats
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.rv: str | None = None
        self.backoff = settings.backoff_initial
        self.failures_at: tuple[str | None, int] = (None, 0)

    def failure(self, error: str) -> bool:
        """Count a failure at the current version; True when it is time to list again."""
        self.stats.failed(error)
        same = self.failures_at[0] == self.rv
        self.failures_at = (self.rv, self.failures_at[1] + 1 if same else 1)
        return self.failures_at[1] >= self.settings.relist_after

    def relist(self, reason: str) -> None:
        self.stats.relists += 1
        log.warning(
            "watch.relisting",
            resource=self.resource.plural,
            reason=reason,
            resource_version=self.rv,
        )
        self.rv = None
        self.stats.resource_version = ""

    async def run(self) -> None:
        what = self.resource.plural
        while True:
            try:
                if self.rv is None:
                    await self.list()
                await self.watch()
            except GoneError:
                self.stats.gone += 1
                log.info("watch.gone", resource=what, resource_version=self.rv)
                self.rv = None
                self.stats.resource_version = ""
            except KubeError as exc:
                if self.optional and exc.status == 404 and self.rv is None:
                    await self.not_served()
                    continue
                again = self.failure(str(exc))
                delay = self.backoff * random.uniform(0.5, 1.5)
                log.warning(
                    "watch.failed",
                    resource=what,
                    status=exc.status,
                    error=str(exc)[:300],
                    retry_in=round(delay, 3),
                )
                if again and self.rv is not None:
                    self.relist(f"{self.settings.relist_after} failures at one resourceVersion")
                await asyncio.sleep(delay)
                self.backoff = min(self.backoff * 2, self.settings.backoff_max)

    async def not_served(self) -> None:
        """An optional resource the API server does not serve: empty until it is."""
        if not self.absent:
            self.absent = True
            log.info(
                "watch.resource_absent",
                resource=self.resource.plural,
                detail="not served (CRD not installed?): treated as empty, listed again "
                f"every {self.settings.backoff_max:g}s",
            )
            if self.ready is not None:
                await self.ready()
            self.consumer.begin()
            self.consumer.end()
        self.stats.served = False
        self.stats.synced.set()
        self.stats.progressed()
        await asyncio.sleep(self.settings.backoff_max)

    async def list(self) -> None:
        self.rv, count = await list_into(
            self.client,
            self.resource,
            self.consumer,
            settings=self.settings,
            stats=self.stats,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            ready=self.ready,
        )
        self.stats.lists += 1
        self.absent = False
        self.stats.served = True
        self.stats.resource_version = self.rv
        self.stats.synced.set()
        self.stats.progressed()
        self.failures_at = (None, 0)
        log.info(
            "watch.listed", resource=self.resource.plural, items=count, resource_version=self.rv
        )

    async def watch(self) -> None:
        assert self.rv is not None
        self.stats.watches += 1
        settings, what = self.settings, self.resource.plural
        async for ev in self.client.watch(
            self.resource,
            resource_version=self.rv,
            timeout_seconds=settings.server_timeout,
            idle_timeout=settings.idle_timeout,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
        ):
            if ev.type == "MALFORMED":
                if self.malformed(ev):
                    return
                continue
            self.rv = _version(ev.object) or self.rv
            self.stats.resource_version = self.rv
            self.backoff = settings.backoff_initial
            self.stats.progressed()
            if ev.type != "BOOKMARK":
                self.stats.events += 1
                _apply(self.consumer.apply, ev, ev.object, what=what, stats=self.stats)
        self.stats.progressed()  # the server ended the watch cleanly

    def malformed(self, ev: WatchEvent) -> bool:
        """Skip a malformed event; True if the watch must end for a re-list."""
        self.stats.malformed += 1
        log.warning(
            "watch.malformed_event",
            resource=self.resource.plural,
            problem=ev.problem,
            resource_version=self.rv,
        )
        if ev.oversized:
            self.relist("an event over the size bound was skipped")
            return True
        if self.failure(f"malformed event: {ev.problem}"):
            self.relist(f"{self.settings.relist_after} failures at one resourceVersion")
            return True
        return False


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


async def list_into(
    client: KubeClient,
    resource: Resource,
    consumer: ListConsumer,
    *,
    settings: WatchSettings = WatchSettings(),
    label_selector: str | None = None,
    field_selector: str | None = None,
    stats: WatchStats | None = None,
    ready: Callable[[], Awaitable[object]] | None = None,
) -> tuple[str, int]:
    """The full state, page by page, into the consumer: (resourceVersion, objects).

    The next page is asked for before this one goes to the consumer, so the server builds
    and sends it while the consumer parses: at most two pages are held at once.
    ``ready``: awaited after the first page has arrived and the second is asked for, before
    the consumer begins (a consumer that needs other state first: the list's first round
    trips overlap the wait for it instead of following it)."""

    async def page(token: str) -> tuple[list[Obj], str, str]:
        return await client.list_page(
            resource,
            limit=settings.page_size,
            continue_token=token,
            label_selector=label_selector,
            field_selector=field_selector,
        )

    def ask(token: str) -> asyncio.Task[tuple[list[Obj], str, str]] | None:
        """The next page, asked for before the current one is parsed."""
        return (
            asyncio.create_task(page(token), name=f"list-page:{resource.plural}") if token else None
        )

    stats = stats if stats is not None else WatchStats()
    count = 0
    items, version, token = await page("")
    pending = ask(token)
    try:
        await asyncio.sleep(0)  # the request leaves before this page is parsed
        if ready is not None:
            await ready()
        consumer.begin()
        while True:
            _consume(items, consumer, resource=resource, stats=stats)
            count += len(items)
            del items
            if pending is None:
                break
            items, page_version, token = await pending
            version = version or page_version
            pending = ask(token)
            await asyncio.sleep(0)
    finally:
        if pending is not None:  # the consumer or a cancellation ended the list early
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
    consumer.end()
    return version, count


def _consume(
    items: list[Obj], consumer: ListConsumer, *, resource: Resource, stats: WatchStats
) -> None:
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


def _version(obj: Obj) -> str | None:
    meta = obj.get("metadata") or {}
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return str(rv)[:64] if rv else None


def stalled_problems(watches: dict[str, WatchStats], bound: float | None = None) -> list[str]:
    """Readiness problems: each watch failing without progress for over ``bound``
    seconds (WatchSettings.stall_after by default)."""
    limit = WatchSettings.stall_after if bound is None else bound
    out = []
    for name, st in watches.items():
        stuck = st.stalled(limit)
        if stuck:
            out.append(f"watch {name} has not progressed for {stuck:.0f}s ({st.last_error[:120]})")
    return out
