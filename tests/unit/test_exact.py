"""Exact compact weights (common/weights/exact.py): narrow copies that hold float32 matrices bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM

from client.combine import PackedHead
from common.weights import exact as exact_module
from common.weights.exact import BLOCK, ExactWeight, KernelError, build_kernels, shared_kernels
from common.weights.fast_linear import TransposedLinear, transpose_linears
from common.weights.files import ModelFiles
from common.wire import codec
from node.model.compact import exact_span
from node.model.loader import load_span
from tests.support.swarm_fixtures import node_info
from tests.unit.test_lean import LEAN_FAMILIES, lean_span, reference_hidden

GGUF_TYPES = {"q4": GGMLQuantizationType.Q4_1, "q8": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo") as info:
            found = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return all(flag in found for flag in flags)


BUILDS = {  # flags of each build a CPU may get: -march=native here, and the narrower ones other CPUs get
    "native": exact_module.FLAG_SETS[0],
    "avx2": ("-O3", "-mavx2", "-mfma", "-pthread"),
    "portable": ("-O3", "-pthread"),
}


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return build_kernels(tmp_path_factory.mktemp("kernels"))


def as_gguf_would(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """`weight` quantised and dequantised by the gguf package (what a model converted from GGUF holds)."""
    if fmt == "bf16":
        return weight.to(torch.bfloat16).float()
    qtype = GGUF_TYPES[fmt]
    return torch.from_numpy(np.ascontiguousarray(dequantize(quantize(weight.numpy(), qtype), qtype))).float()


@pytest.mark.parametrize("fmt", ["q4", "q4_0", "q8", "bf16"])
def test_each_format_holds_gguf_weights_bit_for_bit(fmt, kernels):
    torch.manual_seed(0)
    weight = as_gguf_would(torch.randn(96, 160) * 0.05, fmt)
    exact = ExactWeight.of(weight, kernels)
    assert exact is not None and exact.format == fmt.split("_")[0]  # GGUF's Q4_0 blocks are q4 blocks too
    assert torch.equal(exact.dense(), weight)
    assert torch.equal(exact.dense(10, 20), weight[10:20])
    assert exact.nbytes < weight.numel() * 4 / {"q4": 5, "q4_0": 5, "q8": 3, "bf16": 1.9}[fmt]
    bias = torch.randn(96)
    for rows in (1, 3, 8, 33):  # 33: longer than the kernels take, a dense product
        x = torch.randn(rows, 160)
        reference = (x.double() @ weight.double().t() + bias.double()).float()
        got = exact.linear(x, bias)
        dense = F.linear(x, weight, bias)
        assert got.shape == (rows, 96)
        # as close to the exact sum as float32's own product is (only the order of the sums differs)
        tolerance = max(2 * (dense - reference).abs().max().item(), 1e-6)
        assert (got - reference).abs().max().item() <= tolerance


def test_matrices_with_more_bits_stay_dense(kernels):
    torch.manual_seed(0)
    assert ExactWeight.of(torch.randn(64, 64), kernels) is None  # plain float32 values
    assert ExactWeight.of(as_gguf_would(torch.randn(64, 64), "q8")[:, :48].contiguous(), kernels) is None  # 1.5 blocks
    assert ExactWeight.of(as_gguf_would(torch.randn(64, 64), "q8").double(), kernels) is None  # not float32
    weight = as_gguf_would(torch.randn(64, 64), "q4")
    weight[40, 7] = torch.nextafter(weight[40, 7], torch.tensor(1.0))  # one weight one bit off its block's grid
    exact = ExactWeight.of(weight, kernels)
    assert exact is None or torch.equal(exact.dense(), weight)  # a wider form may hold it; never another value
    assert exact is None or exact.format != "q4"


def test_gradients_pass_through_exact_weights(kernels):
    torch.manual_seed(0)
    weight = as_gguf_would(torch.randn(64, 96), "q4")
    exact = ExactWeight.of(weight, kernels)
    x = torch.randn(5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    upstream = torch.randn(5, 64)
    (got,) = torch.autograd.grad(exact.linear(x), [x], upstream)
    (want,) = torch.autograd.grad(F.linear(x_ref, weight), [x_ref], upstream)
    torch.testing.assert_close(got, want)


def test_without_a_compiler_the_kernels_say_why(tmp_path):
    with pytest.raises(KernelError, match="no C compiler found"):
        build_kernels(tmp_path, compilers=("potluck-no-such-cc",))
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(KernelError, match="could not build exact.c.*cannot compile"):
        build_kernels(tmp_path / "cache", compilers=(str(broken),))


@pytest.fixture(scope="module")
def exact_model_dir(tiny_model_dir, tmp_path_factory):
    """family -> a tiny model whose projections hold GGUF Q4_1, Q8_0 or bfloat16 values (one kind per layer: a fused
    matrix whose parts need different forms stays dense)."""
    made = {}

    def get(family):
        if family not in made:
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32)
            kinds = ["q4", "q8", "bf16"]
            with torch.no_grad():
                for index, layer in enumerate(model.model.layers):
                    for module in layer.modules():
                        if type(module) is torch.nn.Linear:
                            module.weight.copy_(as_gguf_would(module.weight, kinds[index % 3]))
            made[family] = tmp_path_factory.mktemp(f"exact-{family}")
            model.save_pretrained(made[family])
        return made[family]

    return get


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_a_lean_span_on_exact_weights_matches_transformers(family, exact_model_dir, kernels):
    folder = exact_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    span = lean_span(folder, 0, 5)
    report = exact_span(span, kernels)
    assert report.formats == {"q4": 8, "q8": 8, "bf16": 4} and report.dense == 0
    assert report.bytes_after < report.bytes_before / 2
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    expected, positions = reference_hidden(model, ids, mask, 5)
    embeds = model.model.embed_tokens(ids).detach()
    cache = span.new_cache(2, 64)
    with torch.inference_mode():
        outputs = [span(embeds[:, :36], positions[:, :36], mask[:, :36], cache)]  # 72 rows: dense products
        for t in range(36, 40):
            outputs.append(span(embeds[:, t: t + 1], positions[:, t: t + 1], mask[:, : t + 1], cache))
    got = torch.cat(outputs, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_fused_matrices_whose_parts_need_different_forms_are_held_in_parts(tiny_model_dir, tmp_path, kernels):
    """q/k in Q4_0, v in Q8_0, gate in bfloat16 and up left float32 (as a GGUF file may mix types in a layer):
    q/k/v is held as three parts, gate/up as a bfloat16 part beside a dense one; outputs as transformers'."""
    from common.weights.exact import ExactParts

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32)
    kinds = {"q_proj": "q4_0", "k_proj": "q4_0", "v_proj": "q8", "o_proj": "q4", "gate_proj": "bf16", "down_proj": "q8"}
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            kind = kinds.get(name.rsplit(".", 1)[-1])
            if kind is not None:
                module.weight.copy_(as_gguf_would(module.weight, kind))
    model.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    span = lean_span(tmp_path, 0, 5)
    report = exact_span(span, kernels)
    assert report.dense == 0 and report.formats == {"q4": 15, "q8": 10, "bf16": 5}
    layer = span.lean.layers[0]
    assert isinstance(layer.qkv_t, ExactParts) and [type(p).__name__ for p in layer.gate_up_t.parts] == [
        "ExactWeight", "Tensor"]
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 20))
    mask = torch.ones_like(ids)
    expected, positions = reference_hidden(model, ids, mask, 5)
    embeds = model.model.embed_tokens(ids).detach()
    cache = span.new_cache(1, 32)
    with torch.inference_mode():
        got = torch.cat(
            [span(embeds[:, :16], positions[:, :16], mask[:, :16], cache)]
            + [span(embeds[:, t : t + 1], positions[:, t : t + 1], mask[:, : t + 1], cache) for t in range(16, 20)],
            1,
        )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_families_without_a_lean_runtime_hold_exact_linears(family, tiny_model_dir, tmp_path, kernels):
    """transformers' own layers (no lean runtime): each linear layer whose values are 8-bit blocks becomes an
    ExactLinear (experts stored as fused 3-D parameters stay as they are); outputs as transformers'."""
    from common.weights.exact import ExactLinear
    from node.model.compact import exact_formats

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if type(module) is torch.nn.Linear and module.in_features % 32 == 0:
                module.weight.copy_(as_gguf_would(module.weight, "q8"))
    model.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    span, _ = load_span(ModelFiles.open(str(tmp_path)), 0, 4, torch.device("cpu"), torch.float32)
    transpose_linears(span)
    assert span.make_lean() is not None  # no lean runtime for this family
    report = exact_span(span, kernels)
    held = sum(isinstance(m, ExactLinear) for m in span.modules())
    assert held >= 8 and report.formats == {"q8": held} == exact_formats(span)
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    mask = torch.ones_like(ids)
    expected, positions = reference_hidden(model, ids, mask, 4)
    with torch.inference_mode():
        got = span(model.model.embed_tokens(ids), positions, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_random_weights_leave_a_span_dense(tiny_model_dir, kernels):
    span = lean_span(tiny_model_dir("llama"), 0, 2)
    report = exact_span(span, kernels)
    assert report.formats == {} and report.dense == 8 and report.bytes_after == report.bytes_before


def test_the_client_head_uses_an_exact_copy_until_its_weight_changes(kernels):
    if shared_kernels() is None:
        pytest.fail("the exact kernels should build on this machine")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 500, bias=False)
    with torch.no_grad():
        linear.weight.copy_(as_gguf_would(linear.weight, "q8"))
    head = TransposedLinear.from_linear(linear)
    calls = PackedHead(lambda: head)
    assert calls.exact_weight() is not None and calls.exact_weight().format == "q8"
    rows = torch.randn(1, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(calls(rows), head(rows))
        head.weight_t.add_(1e-3 * torch.randn_like(head.weight_t))  # fine-tuned: no longer 8-bit blocks
        assert calls.exact_weight() is None
        torch.testing.assert_close(calls(rows), head(rows), rtol=0, atol=0)
    assert PackedHead(lambda: head, exact=False).exact_weight() is None


def test_a_client_may_take_its_head_in_fast_numerics(kernels):
    """`ClientConfig.head_numerics="fast"`: the head's q8 copy multiplies as llama.cpp would (8-bit activations);
    a bf16 head has no such form and stays exact."""
    from client.config import ClientConfig

    torch.manual_seed(0)
    for fmt, fast in (("q8", True), ("bf16", False)):
        linear = torch.nn.Linear(64, 500, bias=False)
        with torch.no_grad():
            linear.weight.copy_(as_gguf_would(linear.weight, fmt))
        head = TransposedLinear.from_linear(linear)
        calls = PackedHead(lambda: head, numerics="fast")  # noqa: B023 (called in this iteration)
        for count in (3, 40):  # a decode step's rows, and more than the exact kernels take (a scored window)
            rows = torch.randn(1, count, 64)
            with torch.no_grad():
                got, plain = calls(rows), head(rows)
            assert calls.exact_weight().fast == fast
            if fast:  # at every row count, as a fast node's products: `potluck eval` measures what generation gets
                reference = fast_reference(rows.reshape(count, 64), linear.weight).reshape(1, count, 500)
                assert (got - reference).abs().max().item() < 1e-5 * reference.abs().max().item()
                assert not torch.allclose(got, plain, rtol=0, atol=1e-6)  # not exact: 8-bit activations
            else:
                torch.testing.assert_close(got, plain)
    with pytest.raises(ValueError, match="head_numerics"):
        ClientConfig(head_numerics="int4")


def test_a_node_holds_exact_weights_unless_told_not_to(bg_loop, smollm_dir):
    from node.cli.join import join_args

    assert join_args(["--no-exact"]).no_exact and not join_args([]).no_exact
    nodes = [bg_loop.start_node(smollm_dir, 0, 2, exact=exact) for exact in (True, False)]
    try:
        held = [codec.unpack_metadata(node_info(node.address).metadata)["exact"] for node in nodes]
        assert held == [{"q4": 8}, {}]
    finally:
        for node in nodes:
            bg_loop.stop_node(node)


def test_an_unwritable_cache_is_a_clear_error(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(KernelError, match="cannot write the kernel cache"):
        build_kernels(blocked / "kernels")


def test_one_row_products_take_the_thread_count_that_was_faster(kernels):
    from common.weights.exact import calibrate_threads

    torch.manual_seed(0)
    weights = [ExactWeight.of(as_gguf_would(torch.randn(256, 128), "q4"), kernels) for _ in range(4)]
    chosen = calibrate_threads(weights, rounds=3)
    assert chosen in {1, torch.get_num_threads()}
    assert all(w.row_threads == chosen for w in weights)
    x = torch.randn(1, 128)
    torch.testing.assert_close(
        weights[0].product(x), weights[0].product(x, threads=torch.get_num_threads()), rtol=0, atol=0
    )


@pytest.mark.parametrize("fmt", ["q4", "q8", "bf16"])
def test_products_are_the_same_on_any_number_of_threads_and_callers(fmt, kernels):
    """The kernels' own thread pool (kernels/exact.c) splits output rows between threads: every row is summed by
    one thread in one order, so any split, hot or not, and callers on several threads at once get the same bits."""
    import threading

    torch.manual_seed(1)
    exact = ExactWeight.of(as_gguf_would(torch.randn(300, 192) * 0.05, fmt), kernels)
    inputs = {rows: torch.randn(rows, 192) for rows in (1, 5, 8, 32)}
    alone = {rows: exact.product(x, threads=1) for rows, x in inputs.items()}
    for threads in (2, 3, 7):
        for rows, x in inputs.items():
            assert torch.equal(exact.product(x, threads=threads), alone[rows])
            with kernels.hot():
                assert torch.equal(exact.product(x, threads=threads), alone[rows])
    mismatches: list[int] = []

    def caller(seed: int) -> None:
        for _ in range(30):
            rows = (1, 5, 8, 32)[seed % 4]
            if not torch.equal(exact.product(inputs[rows], threads=2), alone[rows]):
                mismatches.append(rows)

    callers = [threading.Thread(target=caller, args=(seed,)) for seed in range(6)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join()
    assert mismatches == []


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("fmt", ["q4", "q8", "bf16"])
def test_every_build_sums_each_row_alone_and_batched_alike(build, fmt, tmp_path, monkeypatch):
    """Each build has its own order of the sums (AVX-512: two registers of 16 per block, each multiply-added
    into a sum of its own; AVX2: four of 8, summed first; portable: one by one). Within a build, every path (one
    row, four output rows at a time, groups of 8/4/2/1 input rows) sums a row in the same order, so a row's bits
    are the same alone and in any batch, and every build stays as close to the exact sum as float32's own
    product."""
    if build == "avx2" and not _cpu_has("avx2", "fma"):
        pytest.skip("this CPU has no AVX2: no AVX2 build runs here")
    monkeypatch.setattr(exact_module, "FLAG_SETS", (BUILDS[build],))
    kernels = build_kernels(tmp_path)
    assert kernels.width == {"native": kernels.width, "avx2": 256, "portable": 0}[build]
    if build == "native" and _cpu_has("avx512f"):
        assert kernels.width == 512
    torch.manual_seed(2)
    weight = as_gguf_would(torch.randn(70, 192) * 0.05, fmt)  # 70 output rows: groups of four and a rest of two
    exact = ExactWeight.of(weight, kernels)
    x = torch.randn(15, 192)  # 15 input rows: a group of 8, of 4, of 2 and a single row
    batched = exact.product(x, threads=1)
    for i in range(15):
        assert torch.equal(exact.product(x[i : i + 1], threads=1)[0], batched[i])
    assert torch.equal(exact.product(x, threads=3), batched)
    reference = (x.double() @ weight.double().t()).float()
    tolerance = max(2 * (F.linear(x, weight) - reference).abs().max().item(), 1e-6)
    assert (batched - reference).abs().max().item() <= tolerance


def test_a_small_pass_runs_torch_on_one_thread_and_products_on_all(kernels, smollm_dir):
    """Inside `Kernels.hot` (a node's decode pass) torch's own operations run on the calling thread only, the
    products keep torch's count, and everything is as before afterwards, errors included."""
    import threading

    from common.weights.exact import KERNEL_ROWS, pass_threads
    from common.weights.threads import saved_threads
    from node.model.compact import span_kernels

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernels.hot():
            assert torch.get_num_threads() == 1 and saved_threads() == 2
            with kernels.hot():  # nested: still the outer count
                assert torch.get_num_threads() == 1 and saved_threads() == 2
            seen: list[int] = []  # another thread is not in this pass
            other = threading.Thread(target=lambda: seen.append(saved_threads()))
            other.start()
            other.join()
            assert seen == [0]
        assert torch.get_num_threads() == 2 and saved_threads() == 0
        with pytest.raises(RuntimeError), kernels.hot():
            raise RuntimeError("a failing pass")
        assert torch.get_num_threads() == 2 and saved_threads() == 0

        span, _ = load_span(ModelFiles.open(str(smollm_dir)), 0, 2, torch.device("cpu"), torch.float32)
        span.make_lean()
        assert span_kernels(span) is None
        dense_hot = pass_threads(span_kernels(span), 1)
        exact_span(span, kernels)
        assert span_kernels(span) is kernels
        with pass_threads(kernels, KERNEL_ROWS):
            assert torch.get_num_threads() == 1
        with pass_threads(kernels, KERNEL_ROWS + 1), dense_hot:  # a prefill, and a span without exact weights
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# -- fast numerics (kernels/fast.c): llama.cpp's Q8_1 activations and integer dot products --------------------
def fast_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the fast kernels compute, in float64: each block of 32 activations rounded to 8-bit codes of step
    max|x| / 127 (ties to even), times the weights."""
    blocks = x.reshape(x.shape[0], -1, BLOCK)
    step = blocks.abs().amax(-1, keepdim=True) / 127.0
    codes = torch.round(blocks * torch.where(step != 0, 1.0 / step, torch.zeros_like(step)))
    return ((codes * step).reshape(x.shape).double() @ weight.double().t()).float()


@pytest.mark.parametrize("build", list(BUILDS))  # AVX-512 + VNNI here; AVX2 and plain C as other CPUs build them
@pytest.mark.parametrize("fmt", ["q4", "q4_0", "q8"])
def test_fast_numerics_are_llama_cpps(fmt, build, tmp_path, monkeypatch):
    if build == "avx2" and not _cpu_has("avx2", "fma"):
        pytest.skip("this CPU has no AVX2: no AVX2 build runs here")
    monkeypatch.setattr(exact_module, "FLAG_SETS", (BUILDS[build],))
    kernels = build_kernels(tmp_path)
    torch.manual_seed(0)
    for width in (192, 160, 576):  # 6 blocks a row; 5 (an odd count: the last block alone); 18 (over 16 minimums)
        weight = as_gguf_would(torch.randn(80, width) * 0.05, fmt)
        exact = ExactWeight.of(weight, kernels)
        assert exact.use_numerics("fast") and exact.fast
        for rows in (1, 3, 8, 33, 70):  # every row count runs the fast kernels (a prefill too)
            x = torch.randn(rows, width)
            x[0, :BLOCK] = 0.0  # a block of zeros: step 0
            got = exact.linear(x)
            reference = fast_reference(x, weight)
            assert (got - reference).abs().max().item() < 1e-5 * max(reference.abs().max().item(), 1.0)
            plain = (x.double() @ weight.double().t()).float()
            assert 1e-4 < ((got - plain).norm() / plain.norm()).item() < 0.02  # not exact: 8-bit activations
            assert all(torch.equal(exact.product(x[i : i + 1])[0], got[i]) for i in range(rows))  # alone or not
            for threads in (1, 2, 3):
                assert torch.equal(exact.product(x, threads=threads), got)
    assert exact.use_numerics("exact") and torch.allclose(exact.linear(x), plain, atol=1e-4)


def test_fast_numerics_leave_bf16_exact(kernels):
    weight = torch.randn(32, 64).to(torch.bfloat16).float()
    exact = ExactWeight.of(weight, kernels)
    assert exact.format == "bf16" and not exact.use_numerics("fast") and not exact.fast
    with pytest.raises(ValueError, match="numerics"):
        exact.use_numerics("approximate")
