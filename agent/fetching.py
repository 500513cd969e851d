"""Fetch the objects a policy needs once it concerns this node.

The cache keeps only stubs of the PolicyEndpoints of policies that select no local pod.
When such a policy comes to select one (its pod chunk arrives after its rule chunks),
the stubs are fetched by name, a few at a time, and handed back to the cache; the pods
the policy selects keep their last programmed state until every object is here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from agent.cache import Cache, Key
from common.kube import CLUSTER_POLICY_ENDPOINTS, POLICY_ENDPOINTS, KubeClient, KubeError

log = structlog.get_logger("agent.fetching")

CONCURRENCY = 8
RETRY_DELAY = 1.0


async def fetch_stubs(
    kube: KubeClient, cache: Cache, *, count: Callable[[str], None] | None = None
) -> None:
    """Runs until cancelled: every stub the cache asks for is fetched (a 404 means the
    watch will say it is gone; any other failure is retried after RETRY_DELAY)."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(key: Key) -> None:
        async with gate:
            try:
                if key[0]:
                    obj = await kube.get(POLICY_ENDPOINTS, key[0], key[1])
                else:  # cluster-scoped (see agent.cache)
                    obj = await kube.get(CLUSTER_POLICY_ENDPOINTS, None, key[1])
            except KubeError as exc:
                if exc.status == 404:
                    _count(count, "gone")
                    cache.fetched(key, None)
                    return
                raise
        _count(count, "fetched")
        cache.fetched(key, obj)

    while True:
        await cache.fetch_needed.wait()
        keys = sorted(cache.take_fetch())
        if not keys:
            continue
        results = await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)
        failed = [k for k, r in zip(keys, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            _count(count, "failed")
            log.warning(
                "policyendpoint.fetch_failed",
                objects=len(failed),
                error=str(next(r for r in results if isinstance(r, BaseException))),
                retry_in=RETRY_DELAY,
            )
            await asyncio.sleep(RETRY_DELAY)
            cache.refetch(failed)


def _count(count: Callable[[str], None] | None, result: str) -> None:
    if count is not None:
        count(result)
