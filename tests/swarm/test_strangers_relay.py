"""Strangers in the public swarm: relays a node dials because records name them (docs/reliability.md, "Public swarm:
what a node dials"). A relay that records place on a loopback or private address is never dialed by a node of a
public swarm; a lab swarm on loopback still attaches to it. An honest client through the same nodes gets exactly
transformers' tokens."""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM

from client import DistributedModelForCausalLM
from node.relay.join import Relayed
from node.relay.link import RelayRefused
from node.rpc.dialing import DialPolicy
from tests.support.swarm_fixtures import attach_or_refusal

IDS = torch.tensor([[4, 8, 15, 16, 23, 42]])


def attach_once(bg_loop, node, policy: DialPolicy):
    """What `node` makes of the relays its swarm's records offer (as relay_if_needed would, were it unreachable)."""
    async def noop(address: str, relay_id: str) -> None:
        pass

    relayed = Relayed(node.membership, node.security, node.address, None, noop, record=lambda: node.record,
                      policy=policy)

    return bg_loop.run(attach_or_refusal(relayed)), relayed


def test_a_public_node_dials_no_relay_a_record_places_on_loopback(bg_loop, tiny_model_dir):
    folder = tiny_model_dir("llama")
    relay = bg_loop.start_node(folder, 0, 3, relay=True, throughput=100.0)
    public = bg_loop.start_node(folder, 3, 6, throughput=100.0, bootstrap=(relay.address,), swarm_scope="public")
    try:
        deadline = time.monotonic() + 30
        while not any(r.relay_slots for r in public.membership.live()):  # the relay's record, proven
            assert time.monotonic() < deadline, "the relay's record never reached the node"
            time.sleep(0.1)
        policy = public.servicer.pusher.policy
        assert not policy.local  # --public-swarm: the node's own policy
        began = time.monotonic()
        refused, relayed = attach_once(bg_loop, public, policy)
        assert isinstance(refused, RelayRefused) and "dial policy" in str(refused), refused
        assert relayed.refused == 1 and time.monotonic() - began < 5
        assert len(relay.servicer.relay.gate.attaches) == 0  # never dialed: no Attach reached the relay
        # the same record in a lab swarm (loopback allowed): attached, so the check above can fail
        address, _ = attach_once(bg_loop, public, DialPolicy(local=True))
        assert isinstance(address, str) and address.rpartition(":")[0] == relay.address.rpartition(":")[0]
        assert len(relay.servicer.relay.gate.attaches) == 1

        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        expected = reference.generate(IDS, max_new_tokens=5, do_sample=False)
        started = time.monotonic()
        model = DistributedModelForCausalLM.from_pretrained(str(folder), peers=[relay.address, public.address])
        try:
            assert torch.equal(model.generate(IDS, max_new_tokens=5, do_sample=False), expected)
        finally:
            model.close()
        assert time.monotonic() - started < 30
    finally:
        bg_loop.stop_node(public)
        bg_loop.stop_node(relay)
