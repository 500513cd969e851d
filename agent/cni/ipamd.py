"""The node's network policy configuration as ipamd (the VPC CNI's daemon) knows it.

On EKS the reference agent asks ipamd at start for the enforcing mode and whether pods
may have several network cards; the CNI plugin sends ipamd's mode with every call too.
When ipamd answers, its word is taken (one source of truth on the node); when it does
not (no socket: not the VPC CNI, or not yet), flags and environment decide, as they
always do elsewhere.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from dataclasses import dataclass

import grpc
import structlog

from agent.cni.service import network_policy_configs

log = structlog.get_logger("agent.cni")

TIMEOUT = 3.0


@dataclass(frozen=True)
class NodeConfig:
    mode: str | None  # "strict" | "standard"; None: ipamd gave none usable
    multi_nic: bool
    addresses: tuple[str, ...]  # the node's primary addresses


async def from_ipamd(socket_path: str, *, timeout: float = TIMEOUT) -> NodeConfig | None:
    """ipamd's configuration, or None if it does not answer."""
    if not socket_path or not await asyncio.to_thread(os.path.exists, socket_path):
        return None
    try:
        reply = await network_policy_configs(socket_path, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        log.warning(
            "ipamd.unavailable",
            socket=socket_path,
            code=exc.code().name,
            error=(exc.details() or "")[:200],
            using="flags and environment",
        )
        return None
    mode: str | None = reply.NetworkPolicyMode.strip().lower()
    if mode not in ("strict", "standard"):
        log.error(
            "ipamd.invalid_mode",
            mode=reply.NetworkPolicyMode[:32],
            using="NETWORK_POLICY_ENFORCING_MODE",
        )
        mode = None
    addresses = []
    for text in (reply.NodeIPv4, reply.NodeIPv6):
        try:
            if text:
                addresses.append(str(ipaddress.ip_address(text)))
        except ValueError:
            log.warning("ipamd.invalid_address", address=text[:64])
    config = NodeConfig(mode, reply.MultiNICEnabled, tuple(addresses))
    log.info(
        "ipamd.config",
        mode=mode,
        multi_nic=config.multi_nic,
        node_addresses=list(config.addresses),
        instance=reply.InstanceID[:32],
    )
    return config
