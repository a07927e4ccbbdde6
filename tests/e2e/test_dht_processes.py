"""The DHT backend with real node processes (issue 24): five `potluck join --discovery dht` processes on loopback,
found through the first one's DHT peer only (no bootstrap, no mDNS); `potluck status --initial-peers` and a client
see the swarm, the client generates exactly what transformers gives; a node killed with SIGKILL (its DHT peer
with it) is forgotten once its entries expire, a drained one at once; the client still generates exactly.

Each node is ~430 MB plus its DHT peer (~190 MB child, much shared, and ~60 MB p2pd): ~3.5 GB in all here."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from client.config import ClientConfig
from node.launcher import NodeProcess
from tests.e2e.test_swarm import wait_until
from tests.support.processes import node_processes, tiny_llama_folder

pytest.importorskip("hivemind")

VOCAB, LAYERS, REFRESH = 512, 6, 1.0  # records live 3 x the refresh: 3 s
NODE_ARGS = ("--no-mdns", "--discovery", "dht", "--dht-refresh", str(REFRESH), "--throughput", "100",
             "--threads", "1", "--no-rebalance")
PEER_LINE = re.compile(r"DHT peer at (\S+)")


@pytest.fixture(scope="module")
def dht_model(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("dht-model"), LAYERS, VOCAB, seed=7)


@pytest.fixture()
def nodes(tmp_path):
    with node_processes(tmp_path, NODE_ARGS, after_stop=_kill_group) as start:  # the DHT peer and p2pd too
        yield lambda model, a, b, *args: start(model, *args, span=(a, b))


def _kill_group(node: NodeProcess) -> None:
    try:
        os.killpg(node.process.pid, signal.SIGKILL)  # nodes run in a session of their own (NodeProcess.start)
    except (ProcessLookupError, PermissionError):
        pass


def dht_peer(node: NodeProcess) -> str:
    """The multiaddr the node printed for its DHT peer (just after its ready line)."""
    def printed():
        return next((m.group(1) for m in map(PEER_LINE.search, list(node.output)) if m), None)
    return wait_until(printed, 30)


def status(peer: str) -> dict[str, dict]:
    """`potluck status --initial-peers PEER --json`: the model's nodes by address."""
    done = subprocess.run([sys.executable, "-m", "node", "status", "--initial-peers", peer, "--no-mdns", "--json",
                           "--wait", "3"], capture_output=True, text=True, timeout=120)
    models = json.loads(done.stdout)["models"] if done.stdout.strip() else []
    return {n["address"]: n for m in models for n in m["nodes"] if n["state"] == "ONLINE"}


def _status_text(peer: str) -> str:
    done = subprocess.run([sys.executable, "-m", "node", "status", "--initial-peers", peer, "--no-mdns", "--json",
                           "--wait", "3"], capture_output=True, text=True, timeout=120)
    return f"exit {done.returncode}: {done.stdout[-1500:]} {done.stderr[-1500:]}"


def generate(folder, peer: str, ids: torch.Tensor) -> list[list[int]]:
    model = DistributedModelForCausalLM.from_pretrained(str(folder), config=ClientConfig(initial_peers=(peer,),
                                                                                        mdns=False))
    try:
        return model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                              eos_token_id=None).tolist()
    finally:
        model.close()


def test_node_processes_found_through_the_dht_only(dht_model, nodes):
    first = nodes(dht_model, 0, 2)
    first.wait_ready(180)
    peer = dht_peer(first)
    assert peer.startswith("/ip4/127.0.0.1/tcp/"), peer
    rest = [nodes(dht_model, a, b, "--initial-peers", peer) for a, b in [(2, 4), (4, 6), (2, 4), (4, 6)]]
    for node in rest:
        node.wait_ready(180)
    everyone = {n.address for n in [first, *rest]}
    try:
        wait_until(lambda: set(status(peer)) == everyone, 60, step=1.0)
    except AssertionError:
        raise AssertionError(f"status saw {sorted(status(peer))} of {sorted(everyone)}; "
                             f"it says: {_status_text(peer)}") from None

    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    reference = AutoModelForCausalLM.from_pretrained(dht_model).eval()
    expected = reference.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids),
                                  eos_token_id=None).tolist()
    assert generate(dht_model, peer, ids) == expected

    killed, drained = rest[2], rest[3]
    killed.process.kill()  # no leave(): the node, its DHT peer and p2pd stop at once
    _kill_group(killed)
    gone = time.monotonic()
    wait_until(lambda: killed.address not in status(peer), 60, step=1.0)
    assert time.monotonic() - gone < 30  # its entries expire 3 s after its last re-store; status takes a few s
    drained.process.send_signal(signal.SIGTERM)  # drain, then an OFFLINE record under each of its keys
    assert drained.process.wait(60) == 0
    seen = status(peer)
    assert drained.address not in seen and killed.address not in seen
    assert set(seen) == {n.address for n in (first, *rest[:2])}
    assert generate(dht_model, peer, ids) == expected
