"""Another peer on this machine: a TCP forwarder whose outgoing connections leave from another loopback address.

A node tells its callers apart by address; every test and benchmark client on one machine is 127.0.0.1. Dialing a
`Masquerade` instead of the node makes a client arrive from 127.0.0.2 (any address of 127.0.0.0/8 is this
machine's own on Linux), so per-peer limits can be exercised with real connections on loopback."""

from __future__ import annotations

import asyncio
import contextlib


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


class Masquerade:
    """Forwards each connection accepted on 127.0.0.1:`port` to `target`, dialing from `source`."""

    def __init__(self, target: str, source: str = "127.0.0.2"):
        self.target = target
        self.source = source
        self.address: str | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self.address

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = self.target.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port), local_addr=(self.source, 0))
        except OSError:
            writer.close()
            return
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except asyncio.CancelledError:
            up_writer.close()
            writer.close()
        finally:
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
