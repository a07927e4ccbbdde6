"""Quantised weights (`--quant int8|nf4`, node/model/quant.py): memory really saved, outputs close to float,
placement counting the quantised size, and a real quantised node in a swarm with float ones."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client.routing import accepts_quant
from client.verify import COMPUTE_TOLERANCE, QUANT_TOLERANCE, WIRE_TOLERANCE, tolerance
from common.swarm.placement import layers_for_memory
from common.weights.fast_linear import transpose_linears
from common.weights.files import ModelFiles
from node.config import ConfigError, NodeConfig
from node.model.loader import bytes_per_layer, load_span
from node.model.quant import (
    Int8Weight,
    NF4Weight,
    QuantError,
    QuantLinear,
    quantize_span,
    quantized_nbytes,
    weight_bytes,
)
from tests.support.records import verified_with_and_without


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-token relative L2 difference (client/verify.py's measure)."""
    return float(((a - b).norm(dim=-1) / ((a.norm(dim=-1) + b.norm(dim=-1)) / 2)).max())


# -- the formats --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(300, 128), (96, 130)])  # 130: not a multiple of 32, no int8 kernel
def test_round_trip_error_is_bounded(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    x = torch.randn(5, shape[1])
    for cls, limit in ((Int8Weight, 0.01), (NF4Weight, 0.11)):  # measured: 0.0065 and 0.092
        q = cls(weight, torch.float32)
        assert relative(q.dequantize()[None], weight[None]) < limit * 2  # per row
        assert float((q.dequantize() - weight).norm() / weight.norm()) < limit
        for rows in (x[:1], x):  # decode-sized (int8 kernel) and prefill-sized products
            assert float((q.linear(rows) - rows @ weight.t()).norm() / (rows @ weight.t()).norm()) < limit * 1.5
    int8 = Int8Weight(weight, torch.float32)
    assert int8.data.dtype == torch.int8 and int8.data.abs().max() <= 127
    assert NF4Weight(weight, torch.float32).packed.numel() == -(-weight.numel() // 64) * 32  # two codes a byte


def test_int8_prefill_product_dequantises_in_blocks_with_the_whole_matrix_numbers():
    """A many-row product dequantises W 1024+ rows at a time (no float copy of the whole matrix): on one thread its
    numbers are those of the whole-matrix product it replaced (MKL computes each column the same way)."""
    torch.manual_seed(0)
    weight = torch.randn(5000, 512) * 0.02  # two blocks: 2048 rows, then 2952 (a short remainder joins its block)
    q = Int8Weight(weight, torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for rows in (9, 32, 100):
            x = torch.randn(rows, 512)
            assert torch.equal(q.linear(x), torch.nn.functional.linear(x, q.data.float()) * q.scales)
    finally:
        torch.set_num_threads(threads)


def test_int8_product_in_bfloat16():
    torch.manual_seed(0)
    weight = torch.randn(64, 96)
    q = Int8Weight(weight, torch.bfloat16)
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    out = q.linear(x, torch.ones(64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert float((out.float() - (x.float() @ weight.t() + 1)).norm() / out.float().norm()) < 0.02


def test_sizes_and_unknown_mode():
    assert quantized_nbytes(100, 64, "int8") == 100 * 64 + 400
    assert quantized_nbytes(100, 64, "nf4") == 100 * 32 + 100 * 4
    with pytest.raises(QuantError):
        quantize_span(None, "int4")
    with pytest.raises(ConfigError, match="--quant"):
        NodeConfig(model="m", quant="fp4")


# -- spans -------------------------------------------------------------------------------------------
def _span(folder, start, end, lean=True):
    span, _ = load_span(ModelFiles.open(str(folder)), start, end, torch.device("cpu"), torch.float32)
    if lean:
        assert span.make_lean() is None
    return span


@pytest.mark.parametrize("family,lean", [("llama", True), ("llama", False), ("mixtral", False)])
def test_quantised_span_stays_close_to_float(family, lean, tiny_model_dir):
    folder = tiny_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
    positions = torch.arange(12)[None]
    outputs = {}
    for mode in ("none", "int8", "nf4"):
        span = _span(folder, 0, 6, lean)
        count = quantize_span(span, mode)
        if mode != "none" and not lean:
            assert count == sum(isinstance(m, QuantLinear) for m in span.modules()) > 0
        cache = span.new_cache(1, 32)
        with torch.no_grad():  # a prefill, then two decode steps (the int8 kernel's row counts)
            parts = [span(embeds[:, :10], positions[:, :10], cache=cache)]
            parts += [span(embeds[:, t : t + 1], positions[:, t : t + 1], cache=cache) for t in (10, 11)]
        outputs[mode] = torch.cat(parts, dim=1)
    # measured (tiny random models, 6 layers; the worst token): int8 0.020 (llama), 0.037 (mixtral);
    # nf4 0.27, 0.22. SmolLM2's 30 layers over real text: int8 0.049, nf4 0.48 (docs/quantization.md)
    assert relative(outputs["int8"], outputs["none"]) < 0.05
    assert relative(outputs["nf4"], outputs["none"]) < 0.4


def test_mixtral_experts_stay_float(tiny_model_dir):
    span = _span(tiny_model_dir("mixtral"), 0, 2, lean=False)
    quantize_span(span, "int8")
    attention = span.layers[0].self_attn
    assert all(isinstance(getattr(attention, n), QuantLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    experts = [p for n, p in span.named_parameters() if "experts" in n]
    assert experts and all(p.dtype == torch.float32 and p.dim() == 3 for p in experts)


@pytest.mark.parametrize("lean", [True, False])
def test_quantised_smollm_span_holds_a_quarter_of_the_bytes(lean, smollm_dir):
    files = ModelFiles.open(str(smollm_dir))
    span, _ = load_span(files, 0, 2, torch.device("cpu"), torch.float32)
    transpose_linears(span)  # as a CPU node does first: the quantised copies must replace these too
    if lean:
        span.make_lean()
    full = weight_bytes(span)
    quantize_span(span, "int8")
    int8 = weight_bytes(span)
    # norms and rotary buffers stay float: measured 0.252
    assert 0.24 < int8 / full < 0.26, (int8, full)
    per_layer = bytes_per_layer(files.config(), torch.float32, "int8")
    assert abs(int8 - 2 * per_layer) / int8 < 0.01  # placement's figure is what the span really holds
    span, _ = load_span(files, 0, 2, torch.device("cpu"), torch.float32)
    if lean:
        span.make_lean()
    quantize_span(span, "nf4")
    assert 0.13 < weight_bytes(span) / full < 0.15  # measured 0.141


def test_placement_fits_more_quantised_layers(smollm_dir):
    config = ModelFiles.open(str(smollm_dir)).config()
    sizes = {mode: bytes_per_layer(config, torch.float32, mode) for mode in ("none", "int8", "nf4")}
    assert 3.9 < sizes["none"] / sizes["int8"] < 4.0
    assert 7.0 < sizes["none"] / sizes["nf4"] < 7.2
    budget = 200_000_000
    layers = {mode: layers_for_memory(budget, size, 30) for mode, size in sizes.items()}
    assert layers == {"none": 11, "int8": 30, "nf4": 30}
    assert layers_for_memory(50_000_000, sizes["int8"], 30) == 11  # a quarter of the budget, as many layers


# -- records, routing, verification --------------------------------------------------------------------
def test_records_carry_quant_and_older_ones_mean_none():
    sent, older = verified_with_and_without("quant", "int8")
    assert sent.quant == "int8" and older.quant == "none"


def test_accept_quant_levels():
    assert accepts_quant("none", "none") and not accepts_quant("int8", "none")
    assert accepts_quant("int8", "int8") and not accepts_quant("nf4", "int8")
    assert all(accepts_quant(q, "any") for q in ("none", "int8", "nf4", "future"))


def test_verification_tolerates_quantisation_only_across_kinds():
    base = tolerance("float32", "float32", "float32")
    assert base == WIRE_TOLERANCE["float32"]
    assert tolerance("float32", "float32", "float32", quants=("int8", "int8")) == base  # the same weights
    assert tolerance("float32", "float32", "float32", quants=("int8", "none")) == QUANT_TOLERANCE["int8"]
    assert tolerance("float32", quants=("nf4", "int8", "none")) == QUANT_TOLERANCE["nf4"]
    assert tolerance("float32", "bfloat16", quants=("none", "int8")) == COMPUTE_TOLERANCE["bfloat16"]


# -- a real quantised node ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_int8_node_in_a_swarm_with_a_float_node(smollm_dir, tokenizer):
    from client import DistributedModelForCausalLM
    from client.config import ClientConfig
    from client.routing import MissingLayersError
    from client.textgen import generate_text
    from node.launcher import NodeProcess

    flags = ("--no-mdns", "--throughput", "20")  # no speed measurement: a faster start
    quantised = NodeProcess(smollm_dir, 0, 15, threads=1, extra_args=("--quant", "int8", *flags)).start()
    # dense float32 (--no-exact): SmolLM2's Q4_1 values would otherwise be held in 4-bit blocks, smaller than int8
    plain = NodeProcess(smollm_dir, 15, 30, threads=1, extra_args=("--no-exact", *flags)).start()
    try:
        peers = (quantised.wait_ready(), plain.wait_ready())
        model = DistributedModelForCausalLM.from_pretrained(
            str(smollm_dir), config=ClientConfig(peers=peers, mdns=False)
        )
        try:
            route = model.swarm.route()
            assert [(hop.peer.quant, hop.start, hop.end) for hop in route] == [("int8", 0, 15), ("none", 15, 30)]
            result = generate_text(model, tokenizer, "What is the capital of France?", chat=True, max_new_tokens=12)
            assert result.text.strip() == "The capital of France is Paris."  # as the float model answers
        finally:
            model.close()
        with pytest.raises(MissingLayersError, match="0:15.*int8-quantised"):  # a client asking for exact outputs
            DistributedModelForCausalLM.from_pretrained(
                str(smollm_dir), config=ClientConfig(peers=peers, mdns=False, accept_quant="none"))
        # the quantised weights really replace the float ones: 15 layers hold ~160 MB less
        rss = {node: _rss(node) for node in (quantised, plain)}
        assert rss[plain] - rss[quantised] > 80e6, rss
    finally:
        codes = [quantised.stop(), plain.stop()]
    assert codes == [0, 0]


def _rss(node) -> int:
    with open(f"/proc/{node.process.pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_in_process_node_advertises_its_quant(bg_loop, tiny_model_dir):
    node = bg_loop.start_node(tiny_model_dir("llama"), 0, 3, quant="nf4", throughput=10.0)
    try:
        assert node.record.quant == "nf4"
        assert all(not isinstance(getattr(layer, "qkv_t"), torch.Tensor) for layer in node.executor.span.lean.layers)
    finally:
        bg_loop.stop_node(node)


def test_quant_from_the_command_line_and_the_config_file(tmp_path):
    from node.cli.join import join_args
    from node.cli.main import build_parser

    assert build_parser().parse_args(["join", "--model", "m", "--quant", "int8"]).quant == "int8"
    assert build_parser().parse_args(["generate", "--model", "m", "--prompt", "p"]).accept_quant == "any"
    toml = tmp_path / "node.toml"
    toml.write_text('model = "m"\nquant = "nf4"\n')
    assert join_args(["--config", str(toml)]).quant == "nf4"
    toml.write_text('model = "m"\nquant = "fp4"\n')
    with pytest.raises(ConfigError, match="quant"):
        join_args(["--config", str(toml)])


def test_bench_table_renders():
    from node.bench.quant import QuantRow, render_markdown

    rows = [QuantRow("m", "llama", mode, 4_000_000 // d, 4_000_000 / d, 10.0, 26.0 * r, 26.0)
            for mode, d, r in (("none", 1, 1.0), ("int8", 4, 1.004))]
    table = render_markdown(rows, 496, 256, 128, 1, "potluck bench-quant --model m")
    assert "| m | llama | int8 | 1.000 | 1.000 | 0.250 | 10.0 | 26.1040 | 26.0000 | 1.0040 |" in table
