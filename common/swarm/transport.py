"""How gossip reaches a peer: one Gossip call. `GrpcTransport` dials over gRPC (gzip, a deadline, channels
closed once idle); the swarm benchmark swaps in an in-memory transport calling `Membership.handle`."""

from __future__ import annotations

import time

import grpc

from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from common.wire.security import PLAINTEXT, Security


class TransportError(Exception):
    """A Gossip call that failed; `code` is the gRPC status code's name."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code


class GrpcTransport:
    def __init__(self, security: Security = PLAINTEXT, idle: float = 60.0):
        self.security = security
        self.idle = idle  # seconds a channel may go unused before it is closed
        self._channels: dict[str, tuple[grpc.aio.Channel, float]] = {}

    async def gossip(self, address: str, request: pb.GossipRequest, timeout: float) -> pb.GossipReply:
        held = self._channels.get(address)
        if held is None:
            await self.security.prefetch(address)
            channel = self.security.channel(address)
        else:
            channel = held[0]
        self._channels[address] = (channel, time.monotonic())
        try:
            return await pb_grpc.PotluckStub(channel).Gossip(request, timeout=timeout,
                                                            compression=grpc.Compression.Gzip)
        except grpc.aio.AioRpcError as error:
            raise TransportError(error.code().name, error.details() or "") from None

    async def close_idle(self) -> int:
        """Close the channels unused for `idle` seconds; returns how many."""
        cutoff = time.monotonic() - self.idle
        stale = [address for address, (_, used) in self._channels.items() if used < cutoff]
        for address in stale:
            channel, _ = self._channels.pop(address)
            await channel.close()
        return len(stale)

    @property
    def open_channels(self) -> int:
        return len(self._channels)

    async def close(self) -> None:
        channels = [channel for channel, _ in self._channels.values()]
        self._channels.clear()
        for channel in channels:
            await channel.close()
