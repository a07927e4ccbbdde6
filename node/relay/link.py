"""The relayed node's side of `rpc Attach`: one outbound stream to a relay; each connection the relay
accepts for us becomes a connection to our own gRPC port, and bytes are copied both ways unread.

Attaching answers the relay's challenge with our signed record (`prove`). Every connection we open to our own
port is noted in `callers` (its own end, as our server names the peer -> the address the relay says it came
from): the servicer charges that caller, not 127.0.0.1. Only this link opens those connections, so nobody else
can claim an address."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from common.wire.generated import relay_pb2 as rpb
from common.wire.generated import relay_pb2_grpc as rpb_grpc
from common.wire.security import Security
from node.relay.relay import CHUNK, LOST_AFTER, QUEUE_FRAMES, grpc_peer, next_frame
from node.rpc.dialing import name_options

log = logging.getLogger(__name__)

ATTACH_TIMEOUT = 5.0  # seconds for the relay to answer an Attach with its address
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 2 * CHUNK + 1024),
                   ("grpc.max_send_message_length", 2 * CHUNK + 1024), ("grpc.enable_retries", 0)]


class RelayRefused(ConnectionError):
    """The relay did not take us (unreachable, RESOURCE_EXHAUSTED, UNAUTHENTICATED, ...); the message says why.

    `code`: the gRPC status of the refusal (UNAVAILABLE when nothing answered; None when unknown)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class RelayLink:
    """Attached to the relay at `relay` on behalf of our own server at `local` (HOST:PORT we dial).

    `prove(challenge)`: the frame answering the relay's challenge (node/relay/relay.py attach_proof); `callers`:
    where the real caller of each tunneled connection is noted (the servicer's `tunneled`)."""

    def __init__(self, relay: str, local: str, security: Security,
                 prove: Callable[[bytes], rpb.Frame] | None = None, callers: dict[str, str] | None = None,
                 dial: str | None = None):
        self.relay = relay
        self.dial = dial or relay  # what to connect to: `relay` as the dial policy resolved it (node/rpc/dialing.py)
        self.local = local
        self.security = security
        self.prove = prove or (lambda challenge: rpb.Frame())
        self.callers = callers if callers is not None else {}
        self.address: str | None = None  # what the relay listens on for us, once attached
        self._outgoing: asyncio.Queue = asyncio.Queue(QUEUE_FRAMES)
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._tasks: set[asyncio.Task] = set()
        self._channel: grpc.aio.Channel | None = None
        self._call = None

    async def attach(self) -> str:
        """Open the stream; returns the address the relay gives us, or raises RelayRefused."""
        await self.security.prefetch(self.dial)
        options = CHANNEL_OPTIONS + name_options(self.relay, self.dial, self.security)
        self._channel = self.security.channel(self.dial, options=options)
        self._call = rpb_grpc.RelayStub(self._channel).Attach(self._frames())
        try:
            challenge = await asyncio.wait_for(self._call.read(), ATTACH_TIMEOUT)
            if challenge is not grpc.aio.EOF:
                await self._outgoing.put(self.prove(challenge.challenge))
            first = await asyncio.wait_for(self._call.read(), ATTACH_TIMEOUT)
        except asyncio.TimeoutError:
            await self.close()
            raise RelayRefused(f"relay {self.relay} did not answer within {ATTACH_TIMEOUT:.0f}s",
                               grpc.StatusCode.UNAVAILABLE) from None
        except grpc.aio.AioRpcError as error:
            await self.close()
            raise RelayRefused(f"relay {self.relay}: {error.code().name}: {error.details()}", error.code()) from None
        if first is grpc.aio.EOF or not first.address:
            await self.close()
            raise RelayRefused(f"relay {self.relay} ended the stream without giving an address")
        self.address = first.address
        return self.address

    async def _frames(self):
        while (frame := await next_frame(self._outgoing)) is not None:
            yield frame

    async def run(self) -> str:
        """Carry connections until the relay goes away; returns why it ended."""
        try:
            while True:
                frame = await asyncio.wait_for(self._call.read(), LOST_AFTER)
                if frame is grpc.aio.EOF:
                    return f"relay {self.relay} ended the stream"
                await self._on_frame(frame)
        except asyncio.TimeoutError:
            return f"relay {self.relay} was silent for {LOST_AFTER:.0f}s"
        except grpc.aio.AioRpcError as error:
            return f"relay {self.relay}: {error.code().name}: {error.details()}"
        finally:
            await self.close()

    async def _on_frame(self, frame: rpb.Frame) -> None:
        if frame.open:
            await self._open(frame.conn, frame.peer)
            return
        writer = self._writers.get(frame.conn)
        if writer is None:
            return  # keepalive, or a connection we closed meanwhile
        if frame.data:
            writer.write(frame.data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                frame = rpb.Frame(conn=frame.conn, close=True)
        if frame.close:
            self._writers.pop(frame.conn, None)
            writer.close()

    async def _open(self, conn: int, caller: str) -> None:
        host, _, port = self.local.rpartition(":")
        try:
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError as error:
            log.warning("relay: cannot reach our own server at %s: %s", self.local, error)
            await self._outgoing.put(rpb.Frame(conn=conn, close=True))
            return
        self._writers[conn] = writer
        own = grpc_peer(writer.get_extra_info("sockname"))  # what our server's context.peer() says
        if caller:
            self.callers[own] = caller
        task = asyncio.ensure_future(self._pump(conn, reader, writer, own))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pump(self, conn: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, own: str) -> None:
        """Our server's bytes for `conn`, onto the stream, until it closes the connection."""
        try:
            while data := await reader.read(CHUNK):
                await self._outgoing.put(rpb.Frame(conn=conn, data=data))
        except (ConnectionError, OSError):
            pass
        finally:
            ours = self._writers.pop(conn, None) is not None
            self.callers.pop(own, None)
            writer.close()
        if ours:
            await self._outgoing.put(rpb.Frame(conn=conn, close=True))

    async def close(self) -> None:
        """Drop the stream and every tunneled connection (their clients see them end and fail over)."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._call is not None:
            self._call.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
