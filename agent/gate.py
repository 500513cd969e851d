"""The strict-mode gate: pod interfaces forward nothing until the datapath judges them.

The tc programs attach when the agent sees a pod's veth: a pod wired without the CNI's
call (or while the agent is down) could send and receive in between. In strict mode an
nftables table closes that gap in the kernel, where it outlives the agent:

    table inet np_agent_gate
      set armed   the ifindexes whose record and programs are in place
      chain forward (hook forward, before everything else)
        iifname "<prefix>*" iif != @armed  drop     one pair per pod interface prefix
        oifname "<prefix>*" oif != @armed  drop

An interface is added to ``armed`` only after its record is written and the programs
are attached, and removed when it disappears; at start the set is replaced with what is
armed now in one transaction (no window). Traffic between a pod and its node (input,
output hooks) is not gated, as the datapath always allows it. The VPC CNI's VLAN links of
branch ENIs (``vlan.eth.<id>``) share the ``vlan`` prefix of branch-ENI pod veths and are
exempt by name (nftables cannot match an interface's kind). In standard mode, or with
network policy off, the table is removed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import structlog

log = structlog.get_logger("agent.gate")

TABLE = "np_agent_gate"
VLAN_LINKS = "vlan.eth.*"  # the VPC CNI's branch-ENI VLAN links: not pod interfaces


class GateError(RuntimeError):
    pass


async def _nft(script: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "nft",
        "-f",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate(script.encode())
    if proc.returncode != 0:
        raise GateError(err.decode(errors="replace").strip()[:500])


def _quote(prefix: str) -> str:
    if not prefix or any(c in prefix for c in '"*\\ \t\n;{}'):
        raise GateError(f"interface prefix {prefix!r} cannot be matched by nftables")
    return f'"{prefix}*"'


def ruleset(prefixes: Iterable[str], armed: Iterable[int]) -> str:
    """One transaction: the table, its set replaced with ``armed``, its rules."""
    lines = [
        f"add table inet {TABLE}",
        f"add set inet {TABLE} armed {{ type iface_index; }}",
        f"add chain inet {TABLE} forward "
        "{ type filter hook forward priority -300; policy accept; }",
        f"flush chain inet {TABLE} forward",
        f"flush set inet {TABLE} armed",
    ]
    for prefix in prefixes:
        name = _quote(prefix)
        for side in ("iif", "oif"):
            exempt = f'{side}name != "{VLAN_LINKS}" ' if VLAN_LINKS.startswith(prefix) else ""
            lines.append(
                f"add rule inet {TABLE} forward {side}name {name} {exempt}"
                f"{side} != @armed counter drop"
            )
    elements = sorted(set(armed))
    if elements:
        lines.append(f"add element inet {TABLE} armed {{ {', '.join(map(str, elements))} }}")
    return "\n".join(lines) + "\n"


class Gate:
    """The gate of one node (its network namespace: where the agent runs)."""

    def __init__(self, prefixes: Iterable[str], *, enabled: bool) -> None:
        self.prefixes = tuple(prefixes)
        self.enabled = enabled
        self.armed: set[int] = set()
        self.errors = 0

    async def install(self, armed: Iterable[int]) -> None:
        """Strict: the gate with exactly ``armed`` open. Otherwise: no gate."""
        if not self.enabled:
            try:
                await _nft(f"delete table inet {TABLE}\n")
                log.info("gate.removed", reason="not strict mode")
            except GateError:
                pass  # there was none
            return
        self.armed = set(armed)
        await _nft(ruleset(self.prefixes, self.armed))
        log.info("gate.installed", table=TABLE, armed=len(self.armed), prefixes=self.prefixes)

    async def open(self, ifindexes: Iterable[int]) -> None:
        new = sorted(set(ifindexes) - self.armed)
        if not self.enabled or not new:
            return
        try:
            await _nft(f"add element inet {TABLE} armed {{ {', '.join(map(str, new))} }}\n")
        except GateError as exc:
            self.errors += 1
            log.error("gate.open_failed", ifindexes=new, error=str(exc))
            return
        self.armed.update(new)

    async def close(self, ifindexes: Iterable[int]) -> None:
        """Forget interfaces that are gone (an ifindex may be reused by a new link)."""
        gone = sorted(set(ifindexes) & self.armed)
        if not self.enabled or not gone:
            return
        self.armed -= set(gone)
        try:
            await _nft(f"delete element inet {TABLE} armed {{ {', '.join(map(str, gone))} }}\n")
        except GateError as exc:
            self.errors += 1
            log.warning("gate.close_failed", ifindexes=gone, error=str(exc))
