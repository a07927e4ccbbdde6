"""A port a node already listens on: the next node on it is refused instead of sharing it (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from common.ports import PortInUseError
from node.server import GRPC_OPTIONS


def test_second_node_on_a_taken_port_is_refused(tiny_model_dir, bg_loop):
    folder = tiny_model_dir("llama")
    first = bg_loop.start_node(folder, 0, 2)
    port = int(first.address.rpartition(":")[2])
    try:
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is in use"):
            bg_loop.start_node(folder, 2, 4, port=port)
    finally:
        bg_loop.stop_node(first)


def test_grpc_options_do_not_share_ports():
    """The check before binding can lose a race (two nodes starting at once): then gRPC's bind itself must fail."""

    async def bind_twice() -> None:
        first = grpc.aio.server(options=GRPC_OPTIONS)
        port = first.add_insecure_port("127.0.0.1:0")
        await first.start()
        try:
            with pytest.raises(RuntimeError):
                grpc.aio.server(options=GRPC_OPTIONS).add_insecure_port(f"127.0.0.1:{port}")
        finally:
            await first.stop(0)

    asyncio.run(bind_twice())
