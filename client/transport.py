"""gRPC plumbing for the client: an event loop in a background thread and one channel per peer.

`generate` is synchronous; the network is grpc.aio. `LoopThread.run(coro)` bridges the two."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import TypeVar

import grpc

from client.routing import PeerInfo
from common.wire import codec, contract
from common.wire.codec import MAX_MESSAGE_BYTES
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from common.wire.security import PLAINTEXT, Security

T = TypeVar("T")

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class PeerError(RuntimeError):
    """A call to a peer failed; `code` is the gRPC status code (or None for a local failure)."""

    def __init__(self, address: str, message: str, code: grpc.StatusCode | None = None, *, label: bool = True):
        self.address = address
        self.code = code
        self.reason = message  # what went wrong, without the peer's address
        label = f" [{code.name}]" if code is not None and label else ""
        super().__init__(f"peer {address}{label}: {message}")

    @classmethod
    def from_rpc(cls, address: str, error: grpc.aio.AioRpcError) -> "PeerError":
        details = error.details() or str(error.code())
        plain = _unreachable(details) if error.code() == grpc.StatusCode.UNAVAILABLE else None
        if plain is not None:  # said in words: the status name and gRPC's text would only repeat it
            return cls(address, plain, error.code(), label=False)
        return cls(address, details, error.code())


def _unreachable(details: str) -> str | None:
    """gRPC's text for a connection that never opened (`failed to connect to all addresses; last error: UNKNOWN:
    ipv4:127.0.0.1:5001: Failed to connect to remote host: Connection refused`) as one plain phrase; None if
    the call failed otherwise."""
    if "Connection refused" in details:
        return "connection refused: no node listens there (is it running, and is this the port it printed?)"
    if "DNS resolution failed" in details:
        return "cannot resolve the host name"
    if "failed to connect to all addresses" in details:
        return f"cannot connect ({details.rsplit(': ', 1)[-1].strip()})"
    return None


class LoopThread:
    """A private asyncio loop on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="potluck-client-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[object, object, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_running():
            try:
                self.run(self._cancel_pending(), timeout=5)
            except Exception:  # closing anyway
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self.loop.is_running():
            self.loop.close()

    @staticmethod
    async def _cancel_pending() -> None:
        """Cancel and await what is left on the loop (gRPC status tasks of failed streams, say)."""
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


MEMORY_PARTS = ("weights", "kv_cache", "baseline", "resident", "peak")


def memory_parts(value) -> tuple[tuple[str, int], ...]:
    """A node's reported memory (Info metadata "memory": bytes by part), the known parts with whole-number values."""
    if not isinstance(value, dict):
        return ()
    return tuple((part, int(value[part])) for part in MEMORY_PARTS
                 if isinstance(value.get(part), (int, float)) and not isinstance(value.get(part), bool)
                 and 0 <= value[part] < 1 << 62)


class Peer:
    """A channel and stub to one node. Create and use it on the client's loop."""

    def __init__(self, address: str, security: Security = PLAINTEXT):
        self.address = address
        self.security = security  # swarm token on every call; TLS (auto: pinned to the node's identity)
        self.channel = security.channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.PotluckStub(self.channel)

    async def info(self, timeout: float) -> PeerInfo:
        try:
            reply = await self.stub.Info(pb.InfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            raise PeerError.from_rpc(self.address, error) from None
        if reply.protocol_version != contract.PROTOCOL_VERSION:
            raise PeerError(
                self.address,
                f"speaks protocol version {reply.protocol_version}, this client speaks {contract.PROTOCOL_VERSION}",
            )
        pinned = self.security.pinned_node(self.address)
        if pinned is not None and pinned != reply.node_id:
            raise PeerError(self.address, f"presents the certificate of node {pinned[:12]} but says it is node "
                            f"{reply.node_id[:12]}: not trusted", grpc.StatusCode.UNAUTHENTICATED)
        extra = codec.unpack_metadata(reply.metadata)
        exact = extra.get("exact") if isinstance(extra.get("exact"), dict) else {}
        return PeerInfo(
            address=self.address,
            node_id=reply.node_id,
            throughput=float(extra.get("throughput", 0.0) or 0.0),
            prefill_throughput=float(extra.get("prefill_throughput", 0.0) or 0.0),
            load=float(extra.get("sessions", 0) or 0),
            state=str(extra.get("state", "ONLINE")),
            started_at=float(extra.get("started_at", 0.0) or 0.0),
            adapters=tuple(a for a in extra.get("adapters", ()) if isinstance(a, str)),
            exact=tuple(sorted((str(form), n) for form, n in exact.items() if isinstance(n, int) and n > 0)),
            memory=memory_parts(extra.get("memory")),
            start=reply.start,
            end=reply.end,
            model_id=reply.model_id,
            config_hash=reply.config_hash,
            num_layers=reply.num_layers,
            hidden_size=reply.hidden_size,
            dtype=reply.dtype,
            device=reply.device,
            quant=str(extra.get("quant", "none") or "none"),
            numerics=str(extra.get("numerics", "exact") or "exact"),
            max_length=reply.max_length,
            free_cache_tokens=reply.free_cache_tokens,
        )

    async def close(self) -> None:
        await self.channel.close()
