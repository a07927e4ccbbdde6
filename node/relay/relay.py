"""The relay's side: `rpc Attach` (protos/relay.proto).

For each attached node the relay listens on a fresh TCP port of its own host and carries every
connection accepted there over the node's stream as frames, each opened with the address it came from (the
node's limits charge that caller). It reads nothing of the bytes (TLS between client and node stays end to
end). Only swarm members attach: the node's first frame carries its signed peer record and its key's signature
over a fresh challenge (node/relay/gate.py). Limits: attaches per address (gate.py), how many nodes at once
(`--relay-max-nodes`) and how many bytes a second each node's connections may move (`--relay-max-bytes`, both
directions together)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc

from common.wire.generated import relay_pb2 as rpb
from node.relay.gate import AttachGate, ProofError, attach_proof, check_proof  # noqa: F401 (their home until now)

log = logging.getLogger(__name__)

CHUNK = 64 * 1024          # bytes read from a tunneled connection per frame
QUEUE_FRAMES = 64          # frames waiting for the stream at most (then reading the sockets pauses)
KEEPALIVE = 10.0           # seconds between keepalive frames each way
LOST_AFTER = 3 * KEEPALIVE  # silence after which the other side counts as gone
def grpc_peer(peername) -> str:
    """A socket's peer ((host, port, ...)) as gRPC names peers: "ipv4:1.2.3.4:5", "ipv6:[::1]:5"."""
    if not peername:
        return ""
    host, port = peername[0], peername[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


async def next_frame(outgoing: asyncio.Queue) -> rpb.Frame | None:
    """The next frame to send on a link (either side), an empty keepalive frame after KEEPALIVE s of
    nothing, or None once the link is closing."""
    try:
        return await asyncio.wait_for(outgoing.get(), KEEPALIVE)
    except asyncio.TimeoutError:
        return rpb.Frame()


class ByteBucket:
    """A token bucket of `rate` bytes a second (bursts of one second); `take` waits for room. 0: no limit."""

    def __init__(self, rate: int):
        self.rate = rate
        self.level = float(rate)
        self.stamp = time.monotonic()

    async def take(self, size: int) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self.level = min(float(self.rate), self.level + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.level >= min(size, self.rate):
                self.level -= size  # may go below 0 for a frame larger than a second's worth
                return
            await asyncio.sleep((min(size, self.rate) - self.level) / self.rate)


@dataclass(frozen=True)
class RelayLimits:
    max_nodes: int = 8          # nodes attached at once; more get RESOURCE_EXHAUSTED
    max_bytes: int = 16 * 2**20  # bytes a second per node (both directions); 0 = no limit


@dataclass
class Tunnel:
    """One attached node: its listening port, its connections, the frames waiting for its stream."""

    peer: str
    bucket: ByteBucket
    node_id: str = ""  # the identity it proved
    outgoing: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(QUEUE_FRAMES))
    writers: dict[int, asyncio.StreamWriter] = field(default_factory=dict)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    tasks: set[asyncio.Task] = field(default_factory=set)
    listener: asyncio.base_events.Server | None = None
    bytes_in: int = 0   # from clients to the node
    bytes_out: int = 0  # from the node to clients

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = next(self.ids)
        self.writers[conn] = writer
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            await self.outgoing.put(rpb.Frame(conn=conn, open=True, peer=grpc_peer(writer.get_extra_info("peername"))))
            try:
                while data := await reader.read(CHUNK):
                    await self.bucket.take(len(data))
                    self.bytes_in += len(data)
                    await self.outgoing.put(rpb.Frame(conn=conn, data=data))
            except (ConnectionError, OSError):
                pass
            if self.writers.pop(conn, None) is not None:  # the client ended it, not the node: say so
                await self.outgoing.put(rpb.Frame(conn=conn, close=True))
        except asyncio.CancelledError:  # the tunnel closed (asyncio 3.11 logs a cancelled handler as an error)
            pass
        finally:
            self.tasks.discard(task)
            self.writers.pop(conn, None)
            writer.close()

    async def deliver(self, frame: rpb.Frame) -> None:
        """A frame from the node: bytes for a connection, or its end."""
        writer = self.writers.get(frame.conn)
        if writer is None:
            return  # closed on our side meanwhile (or a keepalive)
        if frame.data:
            await self.bucket.take(len(frame.data))
            self.bytes_out += len(frame.data)
            writer.write(frame.data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                frame = rpb.Frame(conn=frame.conn, close=True)
        if frame.close:
            self.writers.pop(frame.conn, None)
            writer.close()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
        for task in list(self.tasks):
            task.cancel()


class RelayServicer:
    """`rpc Attach` on a node that volunteers as a relay; registered next to the Potluck service."""

    def __init__(self, limits: RelayLimits, bind_host: str, public_host: str):
        self.limits = limits
        self.bind_host = bind_host        # where tunnel ports listen (the node's --host)
        self.public_host = public_host    # the host in the addresses handed out (the relay's advertised host)
        self.tunnels: dict[int, Tunnel] = {}
        self._ids = itertools.count(1)
        self.gate = AttachGate()  # per-address attach limit and the membership challenge (node/relay/gate.py)

    async def Attach(self, requests, context: grpc.aio.ServicerContext):
        challenge = await self.gate.admit(context)
        yield rpb.Frame(challenge=challenge)
        iterator = requests.__aiter__()
        node_id = await self.gate.proven(iterator, challenge, context)  # only then does a caller learn our limits
        for old in [t for t in self.tunnels.values() if t.node_id == node_id]:  # the same node attaching again
            old.close()
            with contextlib.suppress(asyncio.QueueFull):  # else its stream ends once its queued frames are out
                old.outgoing.put_nowait(None)
        if len(self.tunnels) >= self.limits.max_nodes:  # filled while this one proved itself
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this relay carries {len(self.tunnels)} nodes already, its limit "
                                f"(--relay-max-nodes {self.limits.max_nodes}); attach to another relay")
        key = next(self._ids)
        tunnel = self.tunnels[key] = Tunnel(peer=context.peer(), bucket=ByteBucket(self.limits.max_bytes),
                                            node_id=node_id)
        reader = None
        try:
            tunnel.listener = await asyncio.start_server(tunnel.accept, host=self.bind_host, port=0)
            port = tunnel.listener.sockets[0].getsockname()[1]
            address = f"[{self.public_host}]:{port}" if ":" in self.public_host else f"{self.public_host}:{port}"
            log.info("relaying for %s on %s (%d nodes attached)", tunnel.peer, address, len(self.tunnels))
            yield rpb.Frame(address=address)
            reader = asyncio.ensure_future(self._read(iterator, tunnel))
            while True:
                frame = await next_frame(tunnel.outgoing)
                if frame is None:
                    break
                yield frame
        finally:
            if reader is not None:
                reader.cancel()
            tunnel.close()
            del self.tunnels[key]
            log.info("stopped relaying for %s (%d bytes in, %d out)", tunnel.peer, tunnel.bytes_in, tunnel.bytes_out)

    async def _read(self, iterator, tunnel: Tunnel) -> None:
        """The node's frames, until its stream ends or falls silent; then end the reply stream too."""
        try:
            while True:
                frame = await asyncio.wait_for(iterator.__anext__(), LOST_AFTER)
                await tunnel.deliver(frame)
        except (StopAsyncIteration, asyncio.TimeoutError, grpc.aio.AioRpcError, ConnectionError):
            pass
        except Exception:  # a malformed frame (INVALID_ARGUMENT from the parser) or a bug: end this tunnel only
            log.exception("relay stream from %s failed", tunnel.peer)
        finally:
            tunnel.close()
            await tunnel.outgoing.put(None)
