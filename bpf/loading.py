"""Loading the datapath object against the pins: sizes, upgrades, program pins.

Maps pinned under the pin root are reused (their contents are the node's enforcement);
a size asked for that differs from a pinned map's is refused, since resizing means
recreating the map. Counter maps whose layout an upgrade changed are recreated.
"""

from __future__ import annotations

import ctypes
import os
from importlib import resources

import structlog

from bpf import layout as lay
from bpf.errors import BpfError
from bpf.maps import Map
from bpf.objects import BpfObject, Program
from bpf.pins import PinPaths
from bpf.registry import GRACE

log = structlog.get_logger("bpf.loading")

OBJECT_ENV = "NP_BPF_OBJECT"


def object_path() -> str:
    """The prebuilt object shipped with the package, or the one ``$NP_BPF_OBJECT``
    names (a datapath build to roll out or test: its maps must keep the layouts of
    bpf/np.h, which the pinned maps are checked against at load)."""
    return os.environ.get(OBJECT_ENV) or str(resources.files("bpf").joinpath(lay.OBJECT_FILE))


def load_object(
    pins: PinPaths, *, ct_entries: int | None, events_bytes: int | None, path: str | None
) -> BpfObject:
    """The object loaded with the pinned maps reused (created on first use), its
    programs pinned. Sizes left as None take the pinned map's (or the default)."""
    if ct_entries is not None and not (
        lay.NP_CT_MIN_ENTRIES <= ct_entries <= lay.NP_CT_MAX_ENTRIES
    ):
        raise ValueError(
            f"conntrack table size {ct_entries} outside "
            f"{lay.NP_CT_MIN_ENTRIES}..{lay.NP_CT_MAX_ENTRIES}"
        )
    map_dir = pins.maps
    sizes = {
        name: size
        for name, size in (
            (lay.MAP_CT, _sized(map_dir, lay.MAP_CT, ct_entries, "conntrack table size")),
            (
                lay.MAP_EVENTS,
                _sized(map_dir, lay.MAP_EVENTS, events_bytes, "event ring buffer size"),
            ),
        )
        if size is not None
    }
    _recreate_stale_counters(map_dir)
    for name, size in sizes_from_env().items():
        # a pinned map keeps its size (the test build's small tables survive restarts)
        sizes.setdefault(name, _sized(map_dir, name, None, name) or size)
    obj = BpfObject.load(path or object_path(), map_pin_dir=map_dir, max_entries=sizes)
    try:
        pins.make_dirs()
        for name, prog in list(obj.programs.items()):
            pinned = _same_pinned(prog, pins.program(prog.name))
            if pinned is not None:
                obj.programs[name] = pinned
                prog.close()
            else:
                prog.pin(pins.program(prog.name))
    except BaseException:
        obj.close()
        raise
    return obj


def _same_pinned(prog: Program, path: str) -> Program | None:
    """The program pinned at ``path`` if it is the same as ``prog``: the same
    instructions (the kernel's tag, which leaves map references out) using the same
    maps. A restart then keeps the programs already attached to every pod's veth, and
    need not attach them again. None: not pinned, or different (an upgrade)."""
    try:
        pinned = Program.from_pin(path)
    except BpfError:
        return None
    same = pinned.info.tag == prog.info.tag and sorted(pinned.info.map_ids) == sorted(
        prog.info.map_ids
    )
    if not same:
        pinned.close()
        return None
    return pinned


SIZES_ENV = "NP_MAP_SIZES"  # tests only: "np_pod_meta=32,np_policies=32" (small capacities)
GRACE_ENV = "NP_ID_GRACE"  # tests only: seconds a retired id keeps its name


def sizes_from_env() -> dict[str, int]:
    out: dict[str, int] = {}
    for part in os.environ.get(SIZES_ENV, "").split(","):
        name, sep, value = part.strip().partition("=")
        if sep and value.isdigit():
            out[name] = int(value)
    return out


def grace_from_env() -> float:
    try:
        return float(os.environ.get(GRACE_ENV, GRACE))
    except ValueError:
        return GRACE


# Maps whose contents may be dropped when their layout changed between versions (an
# upgrade that adds a counter): the pin is removed and the map created anew. Every other
# map holds enforcement state; a layout change there is refused by libbpf at load.
_DISPOSABLE = {lay.MAP_STATS: lay.NpStats}


def _recreate_stale_counters(map_dir: str) -> None:
    for name, struct_type in _DISPOSABLE.items():
        path = os.path.join(map_dir, name)
        if not os.path.exists(path):
            continue
        with Map.from_pin(path) as pinned:
            have = pinned.raw_value_size
        want = ctypes.sizeof(struct_type)
        if have != want:
            os.unlink(path)
            log.warning(
                "datapath.map_recreated",
                map=name,
                old_value_size=have,
                new_value_size=want,
                reason="layout changed by an upgrade; its counters start again from zero",
            )


class PinnedSizeError(ValueError):
    """A requested map size differs from the size of the map already pinned."""


def _sized(map_dir: str, name: str, wanted: int | None, what: str) -> int | None:
    path = os.path.join(map_dir, name)
    if not os.path.exists(path):
        return wanted
    with Map.from_pin(path) as pinned:
        have = pinned.max_entries
    if wanted is not None and wanted != have:
        raise PinnedSizeError(
            f"{what} {wanted} differs from {have} of the map pinned at {path}; it cannot "
            f"change while the map exists (remove the pin, e.g. by rebooting the node, "
            f"or keep {have})"
        )
    return have
