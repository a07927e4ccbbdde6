"""A TCP proxy that delays every byte by a fixed one-way latency: a simulated WAN on loopback.

Each accepted connection gets its own connection to the target and two pipes (one per
direction). A pipe's reader stamps every chunk it reads at time t with t + delay and queues
it; the pipe's writer waits until that time and writes. So a chunk is delayed by `delay`
(plus scheduling noise), chunks keep their order, and delays do not add up: a burst of chunks
arrives as a burst, `delay` later. Bandwidth is not limited. End of stream is forwarded after
the delay too (as a half-close), so request/response protocols and gRPC streams behave as
they would over a link with that latency."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import threading

CHUNK = 256 * 1024  # bytes read at once
_EOF = b""          # queued when the source half-closed


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); brackets allowed around an IPv6 host."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what} {text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class LatencyProxy:
    """Listens on `listen` (port 0: a free one) and forwards to `target`, `delay` seconds each way.

    Use it on a running event loop: `await start()`, `.address`, `await stop()` (or `async with`)."""

    def __init__(self, target: str | tuple[str, int], delay: float, listen: str | tuple[str, int] = ("127.0.0.1", 0)):
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        self.target = parse_address(target, "target") if isinstance(target, str) else target
        self.listen = parse_address(listen, "listen") if isinstance(listen, str) else listen
        self.delay = delay
        self.connections = 0  # accepted so far
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> "LatencyProxy":
        self._server = await asyncio.start_server(self._accept, *self.listen)
        return self

    async def stop(self) -> None:
        """Stop listening and close every connection, both sides, at once (queued bytes are dropped)."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> "LatencyProxy":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        upstream_writer = None
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return  # target unreachable: the client sees the connection close
            async with asyncio.TaskGroup() as pipes:  # one failure (a reset) ends all four
                self._pipe(pipes, client_reader, upstream_writer)
                self._pipe(pipes, upstream_reader, client_writer)
        except* (ConnectionError, OSError):
            pass  # one side reset: close both
        finally:
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    writer.close()
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                        await writer.wait_closed()

    def _pipe(self, tasks: asyncio.TaskGroup, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: a task reads and stamps chunks, another writes each at its time."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        tasks.create_task(self._receive(reader, queue))
        tasks.create_task(self._send(queue, writer))

    async def _receive(self, reader: asyncio.StreamReader, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + self.delay, data))
            if data == _EOF:
                return

    @staticmethod
    async def _send(queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if data == _EOF:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()


class ThreadedProxy:
    """A LatencyProxy on its own event loop thread, for synchronous code (benchmarks, sync clients)."""

    def __init__(self, target: str | tuple[str, int], delay: float, listen: str | tuple[str, int] = ("127.0.0.1", 0)):
        self.proxy = LatencyProxy(target, delay, listen)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="latency-proxy")

    @property
    def address(self) -> str:
        return self.proxy.address

    def start(self) -> "ThreadedProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.proxy.stop(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> "ThreadedProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- command line ---------------------------------------------------------------------------------
def add_proxy_parser(commands) -> None:
    proxy = commands.add_parser("proxy", help="forward TCP to a node with an added one-way delay (simulated WAN)")
    proxy.add_argument("--target", required=True, help="HOST:PORT to forward to (a node's address)")
    proxy.add_argument("--delay-ms", type=float, required=True, help="one-way delay in milliseconds, each direction")
    proxy.add_argument(
        "--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default 127.0.0.1:0: a free port)"
    )
    proxy.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run_proxy_cli(args: argparse.Namespace) -> None:
    if args.delay_ms < 0:
        raise ValueError(f"--delay-ms must be >= 0, got {args.delay_ms}")
    asyncio.run(_serve(LatencyProxy(args.target, args.delay_ms / 1000, args.listen)))


async def _serve(proxy: LatencyProxy) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with proxy:
        host, port = proxy.target
        print(f"potluck proxy listening on {proxy.address} -> {host}:{port}, "
              f"{proxy.delay * 1000:g} ms each way", flush=True)
        await stop.wait()
