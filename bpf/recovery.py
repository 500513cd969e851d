"""Recover the datapath's maps from a running program when their pins are gone.

Pins vanish if bpffs was a private mount of a container that restarted, or if someone
removed them; the programs attached to pod veths keep the maps alive regardless. Pinning
those maps again before loading lets the new loader adopt the live state instead of
starting empty (which would reset every pod to its default until reprogrammed).

Maps no program uses (the names of pods and policies) cannot be recovered this way; the
agent registers those again.
"""

from __future__ import annotations

import os

from bpf import layout as lay
from bpf.maps import Map
from bpf.objects import Program
from bpf.pins import PinPaths

PINNED_BY_NAME = (
    lay.MAP_PODS,
    lay.MAP_RULES,
    lay.MAP_PORTSETS,
    lay.MAP_CT,
    lay.MAP_FRAGS,
    lay.MAP_HOST_ADDRS,
    lay.MAP_HOST_FILTER,
    lay.MAP_CONFIG,
    lay.MAP_STATS,
    lay.MAP_EVENTS,
    lay.MAP_POD_META,
    lay.MAP_POD_DROPS,
    lay.MAP_POLICIES,
    lay.MAP_LEARNED,
)


def pins_missing(pin_root: str) -> bool:
    return not os.path.exists(PinPaths(pin_root).map(lay.MAP_PODS))


def repin_from_program(prog_id: int, pin_root: str) -> list[str]:
    """Pin, under ``pin_root/maps``, the datapath maps used by program ``prog_id``
    (those not pinned already). Returns the names pinned."""
    prog = Program.from_id(prog_id)
    try:
        if prog.name not in (lay.PROG_INGRESS, lay.PROG_EGRESS):
            raise ValueError(f"program {prog_id} is {prog.name!r}, not a datapath program")
        map_ids = prog.info.map_ids
    finally:
        prog.close()
    map_dir = PinPaths(pin_root).maps
    os.makedirs(map_dir, mode=0o700, exist_ok=True)
    pinned = []
    for map_id in map_ids:
        with Map.from_id(map_id) as m:
            path = os.path.join(map_dir, m.name)
            if m.name in PINNED_BY_NAME and not os.path.exists(path):
                m.pin(path)
                pinned.append(m.name)
    return sorted(pinned)
