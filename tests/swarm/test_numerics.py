"""`--numerics fast` (llama.cpp's numerics on the exact compact weights): advertised in records and Info, refused by
clients that accept exact products only (`--accept-numerics exact`), tolerated by verification across kinds."""

from __future__ import annotations

import pytest

from client.config import ClientConfig
from client.routing import PeerInfo, accepts_numerics, weights_kind
from client.transport import PeerError
from client.verify import QUANT_TOLERANCE, WIRE_TOLERANCE, tolerance
from common.wire import codec
from node.config import ConfigError, NodeConfig
from tests.support.records import verified_with_and_without
from tests.support.swarm_fixtures import node_info


def test_records_carry_numerics_and_older_ones_mean_exact():
    sent, older = verified_with_and_without("numerics", "fast")
    assert sent.numerics == "fast" and older.numerics == "exact"


def test_accept_numerics_and_the_verifiers_kinds():
    assert accepts_numerics("exact", "exact") and not accepts_numerics("fast", "exact")
    assert accepts_numerics("fast", "any") and accepts_numerics("", "exact")  # older nodes: exact
    with pytest.raises(ValueError, match="accept_numerics"):
        ClientConfig(accept_numerics="fast")
    with pytest.raises(ConfigError, match="--numerics"):
        NodeConfig(model="m", numerics="approximate")
    fast, exact = PeerInfo("a:1", 0, 2, numerics="fast"), PeerInfo("b:1", 0, 2)
    assert [weights_kind(fast), weights_kind(exact)] == ["fast", "none"]
    assert weights_kind(PeerInfo("c:1", 0, 2, quant="int8", numerics="fast")) == "int8"  # quantised: no fast kernels
    base = tolerance("float32", "float32")
    assert base == WIRE_TOLERANCE["float32"] == tolerance("float32", quants=("fast", "fast"))  # the same numerics
    assert tolerance("float32", quants=("fast", "none")) == QUANT_TOLERANCE["fast"]


def test_numerics_from_the_command_line():
    from node.cli.main import build_parser

    assert build_parser().parse_args(["join", "--model", "m"]).numerics == "exact"
    assert build_parser().parse_args(["join", "--model", "m", "--numerics", "fast"]).numerics == "fast"
    generate = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--accept-numerics", "exact"])
    assert generate.accept_numerics == "exact"


def test_a_client_that_refuses_fast_nodes_routes_around_them(bg_loop, smollm_dir):
    from client import DistributedModelForCausalLM

    fast = bg_loop.start_node(smollm_dir, 0, 30, numerics="fast", throughput=100.0)  # faster on paper
    exact = bg_loop.start_node(smollm_dir, 0, 30, throughput=10.0)
    try:
        assert fast.record.numerics == "fast" and exact.record.numerics == "exact"
        assert codec.unpack_metadata(node_info(fast.address).metadata)["numerics"] == "fast"
        assert codec.unpack_metadata(node_info(exact.address).metadata)["numerics"] == "exact"
        peers = [fast.address, exact.address]
        for accept, served_by in (("any", fast.address), ("exact", exact.address)):
            model = DistributedModelForCausalLM.from_pretrained(
                str(smollm_dir), config=ClientConfig(peers=peers, mdns=False, accept_numerics=accept))
            try:
                assert [hop.peer.address for hop in model.swarm.route()] == [served_by]
            finally:
                model.close()
        with pytest.raises(PeerError, match="fast numerics.*--accept-numerics"):  # said plainly, as for --accept-quant
            DistributedModelForCausalLM.from_pretrained(
                str(smollm_dir), config=ClientConfig(peers=[fast.address], mdns=False, accept_numerics="exact"))
    finally:
        bg_loop.stop_node(fast)
        bg_loop.stop_node(exact)
