"""Load: 110 pods, 1,000 PolicyEndpoints changing without pause; the agent's memory stays
flat, its event loop stays responsive and no task leaks. (``bench.soak`` runs the same
for as long as asked.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from agent.enforcer import GC_MAX_RETIRED
from bpf import layout as lay
from bpf.maps import Map
from simnode.churn import Churn, Vitals, vitals
from tests.privileged.agentrig import AgentRig

PODS, ENDPOINTS, RATE = 110, 1000, 20.0
CHURN_SECONDS = 90.0
WARMUP_SECONDS = 20.0


async def test_memory_lag_and_tasks_stay_flat_under_churn(rig: AgentRig) -> None:
    pods = []
    for i in range(PODS):
        pod = await rig.sim.add_pod(f"p{i}")
        rig.create_pod_object(pod)
        pods.append(pod)
    churn = Churn(rig, pods, endpoints=ENDPOINTS, cidrs=20, rate=RATE)
    churn.create()
    await rig.start_agent("--log-level=info")
    await rig.ready(timeout=60)
    await rig.settle_agent(60)

    samples: list[Vitals] = []
    tries: list[int] = []  # rule tries held in the kernel (np_rules entries)
    started = time.monotonic()

    async def sample() -> None:
        while True:
            samples.append(await vitals(rig, started))
            tries.append(await asyncio.to_thread(_tries_in_kernel, rig))
            await asyncio.sleep(2)

    sampler = asyncio.create_task(sample(), name="vitals")
    try:
        await churn.run(CHURN_SECONDS)
        await rig.settle_agent(60)  # it kept up: everything programmed at the end
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    samples.append(await vitals(rig, started))
    print(
        "\n"
        + "\n".join(
            f"t={s.at:>5}s rss={s.rss_mb} MB lag_max={s.lag_max_s * 1000:.1f} ms "
            f"on_time={s.lag_on_time:.4f} "
            f"tasks={s.tasks} tries={t}"
            for s, t in zip(samples, tries, strict=False)
        )
    )
    steady = [s for s in samples if s.at >= WARMUP_SECONDS]
    half = len(steady) // 2
    first, second = steady[:half], steady[half:]
    assert churn.updates >= RATE * CHURN_SECONDS * 0.9
    # memory: the second half of the run peaks no higher than the first (+2 MB of slack)
    assert max(s.rss_mb for s in second) <= max(s.rss_mb for s in first) + 2.0, samples
    # tasks: a fixed set, whatever the churn. Transient ones (a request being served, the
    # enforcer's two wake-up waiters) move the count by a few; a leak of one task per 300
    # of the 1,800 updates would exceed the bound
    assert max(s.tasks for s in steady) - min(s.tasks for s in steady) <= 6, samples
    # kernel memory: retired tries are collected while the churn goes on (never quiet):
    # at most the live ones (one per PolicyEndpoint set a pod has, both directions) plus
    # the retired ones allowed to wait
    live = 2 * PODS
    assert max(tries) <= live + GC_MAX_RETIRED, tries
    # the event loop stays responsive (compilation runs in a worker thread): 98% of its
    # timer ticks run within 250 ms (99.4% when run alone), and none stalled for a
    # second. Its single worst stall on this 2-core VM, with the test's own fake API
    # server beside it, was 0.4-0.5 s before and after the cluster-policy work: a max
    # alone flaps at a tighter bound. About 15% of ticks run 50 ms late under this
    # churn: issue 20's to bring down.
    assert samples[-1].lag_on_time >= 0.98, samples[-1]
    assert samples[-1].lag_max_s < 1.0, samples[-1]


def _tries_in_kernel(rig: AgentRig) -> int:
    with Map.from_pin(os.path.join(rig.pin_root, "maps", lay.MAP_RULES)) as rules:
        return sum(1 for _ in rules)
