"""Start a node: load the span, serve it over grpc.aio with the standard health service."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from node.config import NodeConfig
from node.model.loader import ModelFiles, config_hash, dtype_name, load_span, resolve_device, resolve_dtype
from node.rpc.codec import MAX_MESSAGE_BYTES
from node.rpc.generated import potluck_pb2_grpc as pb_grpc
from node.rpc.servicer import NodeIdentity, PotluckServicer
from node.runtime.executor import Executor

log = logging.getLogger(__name__)

SERVICE_NAME = "potluck.v1.Potluck"
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass
class RunningNode:
    server: grpc.aio.Server
    executor: Executor
    health: health.aio.HealthServicer
    address: str  # host:port actually bound

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        self.executor.shutdown()


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_node(config: NodeConfig) -> RunningNode:
    """Load the span and start serving; returns once the port is bound and the health status is SERVING."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    files = ModelFiles.open(config.model, revision=config.revision)
    span, _ = await asyncio.to_thread(load_span, files, config.start, config.end, device, dtype)
    executor = Executor(span, cache_tokens=config.cache_tokens, max_length=config.max_length, max_batch=config.max_batch)

    server = grpc.aio.server(options=GRPC_OPTIONS)
    port = server.add_insecure_port(_format_address(config.host, config.port))
    if port == 0:
        raise OSError(f"cannot bind {_format_address(config.host, config.port)}")
    address = _format_address(config.host, port)
    identity = NodeIdentity(
        node_id=config.node_id or address,
        model_id=files.model_id,
        config_hash=config_hash(span.config),
        num_layers=span.config.num_hidden_layers,
        dtype=dtype_name(dtype),
        device=str(device),
    )
    pb_grpc.add_PotluckServicer_to_server(PotluckServicer(executor, identity), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningNode(server=server, executor=executor, health=health_servicer, address=address)


async def run_node(config: NodeConfig, announce=print) -> None:
    """Serve until SIGINT/SIGTERM, then stop gracefully."""
    node = await start_node(config)
    span = node.executor.span
    announce(f"potluck node serving layers {span.start}:{span.end} of {config.model} on {node.address}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping (grace %.1fs)", config.grace_seconds)
        await node.stop(config.grace_seconds)
