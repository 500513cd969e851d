"""What a start of the agent cannot go below on this machine, measured in a process of
its own (as the agent is): the interpreter with the agent's modules imported, then the
node's PolicyEndpoints listed from the API server (every page, decoded) and parsed as
the agent parses them: once one after the other (what each costs), and once as the
agent's watch does it, each page parsed while the server sends the next (the floor).
bench.programming runs it next to the agent's cold start and restart, so that their
figures can be read against it.

    python -m bench.floor --kubeconfig PATH   (prints one JSON object)
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402  (the imports are what is measured)
import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import agent.main  # noqa: E402, F401
from agent.endpoints import from_api  # noqa: E402
from common.kube import POLICY_ENDPOINTS, KubeClient, Obj  # noqa: E402
from common.watching import Replacing, WatchSettings, list_into  # noqa: E402

IMPORTED = time.perf_counter()
PAGE = WatchSettings().page_size  # pages as the agent's watch lists them


class _Parsing(Replacing):
    def add(self, obj: Obj) -> None:
        from_api(obj)

    def replace(self, items: list[Obj]) -> None:
        pass


async def _list(kubeconfig: str) -> dict[str, float]:
    kube = await KubeClient.connect(kubeconfig)
    try:
        t0 = time.perf_counter()
        items: list[dict[str, object]] = []
        token = ""
        while True:
            page, _, token = await kube.list_page(
                POLICY_ENDPOINTS, limit=PAGE, continue_token=token
            )
            items += page
            if not token:
                break
        t1 = time.perf_counter()
        for obj in items:
            from_api(obj)
        t2 = time.perf_counter()
        objects = len(items)
        del items
        await list_into(kube, POLICY_ENDPOINTS, _Parsing())
        t3 = time.perf_counter()
    finally:
        await kube.close()
    return {
        "objects": objects,
        "list_seconds": t1 - t0,
        "parse_seconds": t2 - t1,
        "list_and_parse_seconds": t3 - t2,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True)
    args = p.parse_args()
    out = asyncio.run(_list(args.kubeconfig))
    out["import_seconds"] = IMPORTED - STARTED
    json.dump({k: round(v, 3) for k, v in out.items()}, sys.stdout)


if __name__ == "__main__":
    main()
