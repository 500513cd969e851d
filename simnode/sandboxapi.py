"""What np-sandbox's control socket carries (see :mod:`simnode.sandbox`): the messages,
and the parsing of pod references and ports the helpers and the sandbox share. Light to
import: the helpers load this, not the node.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

STATE_DIR = "/run/np-sandbox"
CONTROL = "control.sock"
NODE = "sandbox-node"
_PORT = re.compile(r"^(\d{1,5})(?:/(TCP|UDP|tcp|udp))?$")
_REF = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)/([a-z0-9]([-a-z0-9]*[a-z0-9])?)$")


# ---- the control API's messages -----------------------------------------------------------
class PodInfo(BaseModel):
    namespace: str
    name: str
    labels: dict[str, str]
    ipv4: str
    ipv6: str
    host_veth: str
    listen: list[str]  # "80/TCP"


class Status(BaseModel):
    kubeconfig: str
    runtime_dir: str
    workdir: str
    pods: list[PodInfo]


class AddPod(BaseModel):
    namespace: str
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    listen: list[str] = Field(default_factory=lambda: ["80/TCP"])


class ProbeRequest(BaseModel):
    client: str  # namespace/name
    server: str
    port: int = Field(ge=1, le=65535)
    protocol: Literal["TCP", "UDP"] = "TCP"
    families: list[int] = Field(default_factory=lambda: [4, 6])  # 4 and/or 6


class Settled(BaseModel):
    programmed: bool
    pending: list[str]  # pods not programmed yet


class ProbeResult(BaseModel):
    allowed: dict[int, bool]  # family -> passed
    why: str = ""  # the agent's explanation when a family was denied


class Done(BaseModel):
    pass


def parse_port(text: str) -> tuple[int, Literal["TCP", "UDP"]]:
    """``80/TCP`` (or ``53/udp``, or ``80``: TCP) -> (80, "TCP")."""
    m = _PORT.match(text.strip())
    if not m or not 1 <= int(m.group(1)) <= 65535:
        raise ValueError(f"{text!r} is not PORT/PROTOCOL (e.g. 80/TCP, 53/UDP)")
    return int(m.group(1)), "UDP" if (m.group(2) or "").upper() == "UDP" else "TCP"


def parse_ref(text: str) -> tuple[str, str]:
    """``namespace/name`` -> (namespace, name)."""
    m = _REF.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not NAMESPACE/NAME (lowercase, e.g. default/demo-app)")
    return m.group(1), m.group(3)
