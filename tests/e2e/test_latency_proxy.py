"""The latency proxy: delay each way without adding delays up, bytes intact, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from node.cli.proxy import LatencyProxy, ThreadedProxy, parse_address

DELAY = 0.05    # one way, seconds
MARGIN = 0.25   # generous: the machine is shared, the event loop and the kernel add their own


class EchoServer:
    """Echoes every byte back; counts the connections it saw end."""

    def __init__(self) -> None:
        self.closed = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> "EchoServer":
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def address(self) -> str:
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.closed += 1
            writer.close()


async def connect(address: str):
    host, port = parse_address(address)
    return await asyncio.open_connection(host, port)


async def test_round_trip_takes_twice_the_delay():
    async with EchoServer() as echo, LatencyProxy(echo.address, DELAY) as proxy:
        reader, writer = await connect(proxy.address)
        times = []
        for i in range(5):
            started = time.perf_counter()
            writer.write(b"ping %d" % i)
            assert await asyncio.wait_for(reader.readexactly(6), 5) == b"ping %d" % i
            times.append(time.perf_counter() - started)
        writer.close()
        await writer.wait_closed()
    assert min(times) >= 2 * DELAY
    assert max(times) < 2 * DELAY + MARGIN, times


async def test_delays_do_not_add_up_in_a_burst():
    """20 chunks sent 5 ms apart arrive 5 ms apart, one round trip later: not 20 delays later."""
    async with EchoServer() as echo, LatencyProxy(echo.address, DELAY) as proxy:
        reader, writer = await connect(proxy.address)
        started = time.perf_counter()
        for i in range(20):
            writer.write(bytes([i]) * 100)
            await asyncio.sleep(0.005)
        sent = time.perf_counter() - started
        data = await asyncio.wait_for(reader.readexactly(2000), 5)
        elapsed = time.perf_counter() - started
        writer.close()
        await writer.wait_closed()
    assert data == b"".join(bytes([i]) * 100 for i in range(20))
    assert 2 * DELAY <= elapsed < sent + 2 * DELAY + MARGIN, (elapsed, sent)


async def test_concurrent_connections_get_their_bytes_intact_and_in_order():
    async with EchoServer() as echo, LatencyProxy(echo.address, 0.01) as proxy:

        async def one(seed: int) -> bool:
            payload = os.urandom(300_000) + bytes([seed])
            reader, writer = await connect(proxy.address)

            async def send() -> None:
                for at in range(0, len(payload), 7_919):  # odd chunks, interleaved with the reads
                    writer.write(payload[at:at + 7_919])
                    await writer.drain()
                writer.write_eof()

            sending = asyncio.create_task(send())
            received = await asyncio.wait_for(reader.read(-1), 30)  # up to the echo's end of stream
            await sending
            writer.close()
            await writer.wait_closed()
            return received == payload

        assert await asyncio.gather(*(one(i) for i in range(8))) == [True] * 8
        assert proxy.connections == 8
    assert echo.closed == 8


async def test_stop_closes_both_sides_and_refuses_new_connections():
    async with EchoServer() as echo:
        proxy = await LatencyProxy(echo.address, DELAY).start()
        address = proxy.address
        reader, writer = await connect(address)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        await asyncio.wait_for(proxy.stop(), 5)
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # end of stream, not a hang
        writer.close()
        await writer.wait_closed()
        for _ in range(100):  # the echo server sees its side end too
            if echo.closed == 1:
                break
            await asyncio.sleep(0.02)
        assert echo.closed == 1
        with pytest.raises(OSError):
            await connect(address)


async def test_unreachable_target_closes_the_client_connection():
    async with EchoServer() as echo:
        target = echo.address
    async with LatencyProxy(target, 0.0) as proxy:  # nothing listens on target any more
        reader, writer = await connect(proxy.address)
        assert await asyncio.wait_for(reader.read(100), 5) == b""
        writer.close()


def test_grpc_through_the_threaded_proxy():
    """A real grpc.aio server's health check, through the proxy from synchronous code."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def serve() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    try:
        with ThreadedProxy(f"127.0.0.1:{port}", DELAY) as proxy, grpc.insecure_channel(proxy.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connects (handshakes cost round trips)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                times.append(time.perf_counter() - started)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert 2 * DELAY <= min(times) and max(times) < 2 * DELAY + MARGIN, times
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def test_cli_prints_its_address_and_forwards():
    async with EchoServer() as echo:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node", "proxy", "--target", echo.address, "--delay-ms", "20",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
            assert line.startswith("potluck proxy listening on 127.0.0.1:"), line
            address = line.split()[4]
            reader, writer = await connect(address)
            started = time.perf_counter()
            writer.write(b"over the cli")
            assert await asyncio.wait_for(reader.readexactly(12), 5) == b"over the cli"
            assert time.perf_counter() - started >= 0.04
            writer.close()
        finally:
            process.terminate()
            assert await asyncio.wait_for(process.wait(), 10) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        LatencyProxy("nowhere", 0.01)
    with pytest.raises(ValueError, match="delay"):
        LatencyProxy("127.0.0.1:1", -1)
    assert parse_address("[::1]:8080") == ("::1", 8080)
