"""In-process nodes on a background event loop (real grpc.aio servers on 127.0.0.1, port 0).

The loop runs on its own thread so that synchronous client code (generate) can call the
nodes from the test's thread."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path

from node.config import NodeConfig
from node.server import RunningNode, start_node


class BackgroundLoop:
    def __init__(self) -> None:
        self.identities = Path(tempfile.mkdtemp(prefix="potluck-ids-"))
        self.count = 0
        self.running: list[RunningNode] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-nodes")
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_node(self, model, start: int | None, end: int | None, **kwargs) -> RunningNode:
        """A node with its own identity file; mDNS off unless asked (tests must not hear each other)."""
        self.count += 1
        kwargs.setdefault("identity", str(self.identities / f"node-{self.count}.pem"))
        kwargs.setdefault("mdns", False)
        node = self.run(start_node(NodeConfig(model=str(model), start=start, end=end, **kwargs)))
        self.running.append(node)
        return node

    def stop_node(self, node: RunningNode) -> None:
        self.running.remove(node)
        self.run(node.stop(0.5))

    def leaked_cache(self, timeout: float = 5.0) -> dict[str, int]:
        """Cache tokens still reserved on running nodes once their streams had `timeout` seconds to end."""
        deadline = time.monotonic() + timeout
        while True:
            leaked = {n.address: n.executor.sessions.reserved_tokens for n in self.running
                      if n.executor is not None and n.executor.sessions.reserved_tokens}
            if not leaked or time.monotonic() > deadline:
                return leaked
            time.sleep(0.05)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def node_info(address: str):
    """A node's Info, over a fresh channel."""
    import grpc

    from common.wire.generated import potluck_pb2 as pb
    from common.wire.generated import potluck_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        return pb_grpc.PotluckStub(channel).Info(pb.InfoRequest(), timeout=5)


def wait_for_full_cache(address: str, budget: int = 65536, timeout: float = 10.0) -> None:
    """Wait until the node at `address` reports its whole cache budget free; fail if it does not."""
    deadline = time.monotonic() + timeout
    while (free := node_info(address).free_cache_tokens) != budget:
        assert time.monotonic() < deadline, f"{address} still holds {budget - free} cache tokens"
        time.sleep(0.05)


async def attach_or_refusal(link):
    """`link.attach()`'s answer (a RelayLink or a Relayed), or the RelayRefused it raised; closed either way."""
    from node.relay.link import RelayRefused

    try:
        return await link.attach()
    except RelayRefused as error:
        return error
    finally:
        await link.close()
