"""The swarm with real node processes on loopback: discovery, placement, leaving, failing, re-balancing."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from client import DistributedModelForCausalLM
from common.swarm.placement import Server, candidate_spans, layer_throughput
from common.swarm.records import NodeState, RecordError, verify_record
from common.wire import codec
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.launcher import NodeProcess

HEARTBEAT, TTL = 0.5, 3.0
FAST = ("--heartbeat", str(HEARTBEAT), "--ttl", str(TTL), "--threads", "1")


@pytest.fixture(scope="module")
def swarm_model(tmp_path_factory):
    """A tiny LLaMA with a config no other test uses, so its config hash is this module's alone."""
    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=520, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    folder = tmp_path_factory.mktemp("swarm-model")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(swarm_model):
    return AutoModelForCausalLM.from_pretrained(swarm_model).eval()


@pytest.fixture()
def processes(tmp_path):
    """Start node processes; every one is stopped at the end of the test."""
    started: list[NodeProcess] = []

    def start(model, blocks=None, *args: str, wait: bool = True) -> NodeProcess:
        start_layer, end_layer = blocks if blocks else (None, None)
        identity = ("--identity", str(tmp_path / f"node-{len(started)}.pem"))
        node = NodeProcess(model, start_layer, end_layer, extra_args=(*FAST, *identity, *args)).start()
        started.append(node)
        if wait:
            node.wait_ready(120)
        return node

    yield start
    for node in started:
        node.stop()


def registry_of(address: str) -> dict[str, object]:
    """A node's registry as it tells it (Gossip pull), verified: node_id -> record."""
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.PotluckStub(channel).Gossip(pb.GossipRequest(), timeout=5)
    records = {}
    for signed in codec.decode_records(reply.records):
        try:
            record = verify_record(signed)
        except RecordError:
            continue
        records[record.node_id] = record
    return records


def live_spans(address: str) -> dict[str, tuple[int, int]]:
    return {r.address: (r.start, r.end) for r in registry_of(address).values() if r.state == NodeState.ONLINE}


def wait_until(predicate, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def generate_and_compare(model: DistributedModelForCausalLM, reference) -> None:
    ids = torch.randint(3, 520, (1, 9), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids), eos_token_id=None)
    assert model.generate(ids, **kwargs).tolist() == reference.generate(ids, **kwargs).tolist()


def test_mdns_only_discovery_and_generation(swarm_model, reference, processes):
    mdns = ("--mdns-interface", "127.0.0.1")
    nodes = [processes(swarm_model, span, *mdns, wait=False) for span in [(0, 2), (2, 4), (4, 6)]]
    addresses = [node.wait_ready(120) for node in nodes]
    for address in addresses:  # every node learned every other one through mDNS alone
        wait_until(lambda a=address: set(live_spans(a)) >= set(addresses), 15)
    model = DistributedModelForCausalLM.from_pretrained(str(swarm_model), mdns_interface="127.0.0.1")
    try:
        assert {h.peer.address for h in model.swarm.route()} == set(addresses)
        generate_and_compare(model, reference)
    finally:
        model.close()


def test_bootstrap_only_discovery_and_generation(swarm_model, reference, processes):
    first = processes(swarm_model, (0, 2), "--no-mdns")
    others = [processes(swarm_model, span, "--no-mdns", "--bootstrap", first.address, wait=False)
              for span in [(2, 4), (4, 6)]]
    addresses = [first.address] + [node.wait_ready(120) for node in others]
    for address in addresses:  # 2:4 and 4:6 learn of each other through the bootstrap node's gossip
        wait_until(lambda a=address: set(live_spans(a)) == set(addresses), 15)
    model = DistributedModelForCausalLM.from_pretrained(str(swarm_model), bootstrap=[first.address], mdns=False)
    try:
        generate_and_compare(model, reference)
    finally:
        model.close()
    done = subprocess.run([sys.executable, "-m", "node", "status", "--no-mdns", "--bootstrap", first.address, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    [view] = [m for m in json.loads(done.stdout)["models"] if m["num_layers"] == 6 and m["nodes"]]
    assert view["missing_layers"] == []
    assert sorted((n["start"], n["end"]) for n in view["nodes"]) == [(0, 2), (2, 4), (4, 6)]
    assert all(n["state"] == "ONLINE" and n["throughput"] > 0 for n in view["nodes"])


def test_auto_placement_follows_the_placement_function(swarm_model, reference, processes):
    joins = [("3", "50"), ("2", "80"), ("2", "60")]  # (--num-blocks, --throughput) of each joiner, in order
    servers: list[Server] = []
    first = None
    for num_blocks, throughput in joins:
        allowed = {(span.start, span.end) for span, _ in candidate_spans(servers, 6, int(num_blocks))}
        bootstrap = ("--bootstrap", first.address) if first else ()
        node = processes(swarm_model, None, "--no-mdns", "--num-blocks", num_blocks, "--throughput", throughput,
                         "--no-rebalance", *bootstrap)
        first = first or node
        assert (node.start_layer, node.end_layer) in allowed  # one of the near-best windows, picked at random
        servers.append(Server(node.address, node.start_layer, node.end_layer, float(throughput)))
    assert min(layer_throughput(servers, 6)) > 0  # each joiner saw the others: the three cover the model
    model = DistributedModelForCausalLM.from_pretrained(str(swarm_model), bootstrap=[first.address], mdns=False)
    try:
        generate_and_compare(model, reference)
    finally:
        model.close()


def test_leaving_failing_and_rebalancing(swarm_model, reference, processes):
    common = ("--no-mdns", "--num-blocks", "2", "--throughput", "100", "--rebalance-period", "1")
    first = processes(swarm_model, None, *common)
    nodes = [first] + [processes(swarm_model, None, *common, "--bootstrap", first.address) for _ in range(3)]
    # Placement picks among near-best windows at random; rebalancing closes any hole that chance leaves.
    covered = lambda spans: len(spans) == 4 and min(layer_throughput(  # noqa: E731
        [Server(a, *span, 1.0) for a, span in spans.items()], 6)) > 0
    assert wait_until(lambda: covered(live_spans(first.address)), 90)
    spans = live_spans(first.address)

    # SIGTERM: the node announces OFFLINE before it exits; every registry drops it within a heartbeat.
    # The one leaving alone serves some layer (4 spans of 2 over 6 layers: some node does), so it opens a hole.
    sole = lambda node: any(  # noqa: E731
        sum(a <= layer < b for a, b in spans.values()) == 1 for layer in range(*spans[node.address]))
    leaving = next(node for node in nodes[1:] if sole(node))
    assert leaving.stop() == 0
    left_at = time.monotonic()
    survivors = [node for node in nodes if node is not leaving]
    for node in survivors:
        wait_until(lambda n=node: leaving.address not in live_spans(n.address), HEARTBEAT)
    assert time.monotonic() - left_at <= HEARTBEAT + 0.5

    # A node whose layers others also serve moves into the hole; nothing else gets uncovered.
    moved = wait_until(lambda: sorted(live_spans(first.address).values()) == [(0, 2), (2, 4), (4, 6)], 90)
    assert moved
    model = DistributedModelForCausalLM.from_pretrained(str(swarm_model), bootstrap=[first.address], mdns=False)
    try:
        generate_and_compare(model, reference)
    finally:
        model.close()

    # SIGKILL: no goodbye, so the node stays listed until its record's TTL runs out.
    victim = survivors[1]
    victim.kill()
    killed_at = time.monotonic()
    assert victim.address in live_spans(nodes[0].address)
    for node in (survivors[0], survivors[2]):
        wait_until(lambda n=node: victim.address not in live_spans(n.address), TTL + 2 * HEARTBEAT + 1)
    assert time.monotonic() - killed_at >= TTL - 2 * HEARTBEAT - 0.5  # it went by expiry, not by announcement
