"""gRPC glue for agent/cni/rpc.proto: the method paths and (de)serializers of the
services, taken from the proto's descriptor, a server on a Unix socket and typed clients.

The messages are generated (rpc_pb2); this module is the only one that knows gRPC
method paths. The server is grpcio's asyncio server, on the agent's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc
import structlog
from google.protobuf.empty_pb2 import Empty
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.cni import rpc_pb2 as pb

log = structlog.get_logger("agent.cni")

NP_BACKEND = pb.DESCRIPTOR.services_by_name["NPBackend"]
CONFIG_BACKEND = pb.DESCRIPTOR.services_by_name["ConfigServerBackend"]
# the reference agent's service name in the standard health service
HEALTH_SERVICE = "grpc.health.v1.np-agent"
# requests are a few short strings: anything larger is not the CNI
MAX_MESSAGE_BYTES = 64 * 1024
MAX_CONCURRENT_CALLS = 1024


def path(service: object, method: str) -> str:
    """The gRPC method path, e.g. /rpc.NPBackend/EnforceNpToPod."""
    full = service.full_name  # type: ignore[attr-defined]
    assert method in service.methods_by_name, method  # type: ignore[attr-defined]
    return f"/{full}/{method}"


def unix_target(socket_path: str) -> str:
    return "unix://" + os.path.abspath(socket_path)


class NpBackend(Protocol):
    """What serves the CNI's two calls (agent.cni.calls.CniCalls)."""

    async def enforce(
        self,
        request: pb.EnforceNpRequest,
        context: grpc.aio.ServicerContext[pb.EnforceNpRequest, pb.EnforceNpReply],
    ) -> pb.EnforceNpReply: ...

    async def delete(
        self,
        request: pb.DeleteNpRequest,
        context: grpc.aio.ServicerContext[pb.DeleteNpRequest, pb.DeleteNpReply],
    ) -> pb.DeleteNpReply: ...


def np_backend_handler(backend: NpBackend) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        NP_BACKEND.full_name,
        {
            "EnforceNpToPod": grpc.unary_unary_rpc_method_handler(
                backend.enforce,
                request_deserializer=pb.EnforceNpRequest.FromString,
                response_serializer=pb.EnforceNpReply.SerializeToString,
            ),
            "DeletePodNp": grpc.unary_unary_rpc_method_handler(
                backend.delete,
                request_deserializer=pb.DeleteNpRequest.FromString,
                response_serializer=pb.DeleteNpReply.SerializeToString,
            ),
        },
    )


def _options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


@contextlib.asynccontextmanager
async def serving(
    socket_path: str, handlers: list[grpc.GenericRpcHandler]
) -> AsyncIterator[grpc.aio.Server]:
    """A gRPC server on ``socket_path`` (a stale file there is replaced; mode 0600), with
    the standard health service reporting SERVING; stopped (calls in flight given a
    second) on exit."""
    await asyncio.to_thread(_prepare, socket_path)
    server = grpc.aio.server(options=_options(), maximum_concurrent_rpcs=MAX_CONCURRENT_CALLS)
    server.add_generic_rpc_handlers(handlers)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(unix_target(socket_path))
    await server.start()
    await asyncio.to_thread(os.chmod, socket_path, 0o600)
    for name in ("", HEALTH_SERVICE):
        await checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield server
    finally:
        await server.stop(1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def _prepare(socket_path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(socket_path)), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)


# ---- clients (the simulated CNI, tests, benchmarks; ipamd's for the agent) ----------
class NpClient:
    """The VPC CNI plugin's side of NPBackend."""

    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.aio.insecure_channel(unix_target(socket_path), options=_options())
        self._enforce = self.channel.unary_unary(
            path(NP_BACKEND, "EnforceNpToPod"),
            request_serializer=pb.EnforceNpRequest.SerializeToString,
            response_deserializer=pb.EnforceNpReply.FromString,
        )
        self._delete = self.channel.unary_unary(
            path(NP_BACKEND, "DeletePodNp"),
            request_serializer=pb.DeleteNpRequest.SerializeToString,
            response_deserializer=pb.DeleteNpReply.FromString,
        )

    async def enforce(
        self,
        *,
        namespace: str,
        name: str,
        mode: str,
        interfaces: int = 1,
        timeout: float | None = None,
    ) -> bool:
        reply = await self._enforce(
            pb.EnforceNpRequest(
                K8S_POD_NAME=name,
                K8S_POD_NAMESPACE=namespace,
                NETWORK_POLICY_MODE=mode,
                InterfaceCount=interfaces,
            ),
            timeout=timeout,
        )
        return bool(reply.Success)

    async def delete(self, *, namespace: str, name: str, timeout: float | None = None) -> bool:
        reply = await self._delete(
            pb.DeleteNpRequest(K8S_POD_NAME=name, K8S_POD_NAMESPACE=namespace), timeout=timeout
        )
        return bool(reply.Success)

    async def raw(self, method: str, body: bytes, *, timeout: float = 5) -> bytes:
        """Call a method with bytes as they are (malformed requests, in tests)."""
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
        call = self.channel.unary_unary(path(NP_BACKEND, method))
        return bytes(await call(body, timeout=timeout))

    async def healthy(self, service: str = HEALTH_SERVICE, *, timeout: float = 2) -> bool:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self.channel.close()


async def network_policy_configs(
    socket_path: str, *, timeout: float
) -> pb.NetworkPolicyAgentConfigReply:
    """Ask ipamd (ConfigServerBackend.GetNetworkPolicyConfigs); grpc.aio.AioRpcError if
    it does not answer within ``timeout``."""
    async with grpc.aio.insecure_channel(unix_target(socket_path)) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[Empty, pb.NetworkPolicyAgentConfigReply]
        call = channel.unary_unary(
            path(CONFIG_BACKEND, "GetNetworkPolicyConfigs"),
            request_serializer=Empty.SerializeToString,
            response_deserializer=pb.NetworkPolicyAgentConfigReply.FromString,
        )
        reply: pb.NetworkPolicyAgentConfigReply = await call(Empty(), timeout=timeout)
        return reply


def config_backend_handler(
    answer: Callable[[], pb.NetworkPolicyAgentConfigReply],
) -> grpc.GenericRpcHandler:
    """ipamd's side (the simulated node's)."""

    async def configs(
        _: Empty, __: grpc.aio.ServicerContext[Empty, pb.NetworkPolicyAgentConfigReply]
    ) -> pb.NetworkPolicyAgentConfigReply:
        return answer()

    return grpc.method_handlers_generic_handler(
        CONFIG_BACKEND.full_name,
        {
            "GetNetworkPolicyConfigs": grpc.unary_unary_rpc_method_handler(
                configs,
                request_deserializer=Empty.FromString,
                response_serializer=pb.NetworkPolicyAgentConfigReply.SerializeToString,
            )
        },
    )
