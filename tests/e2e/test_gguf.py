"""GGUF files pooled as they are: a node dequantises only its span, a client only embeddings, norm and head.

The reference for the embedded SmolLM2 GGUF is `smollm_dir`: `prepare_embedded_model` writes it from
`AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`, so it is transformers' own GGUF load
(dequantised, Q/K permutation undone), saved in float32. The tiny qwen2 file is compared with
transformers' GGUF load directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config

from client.textgen import encode_prompt, load_tokenizer
from common.weights import gguf
from common.weights.client_parts import load_client_parts
from common.weights.embedded import gguf_path
from common.weights.errors import ModelLoadError
from common.weights.files import ModelFiles, config_hash
from common.wire import codec
from node.launcher import start_chain
from node.model.loader import load_span
from tests.support.swarm_fixtures import node_info

CPU = torch.device("cpu")
SPAN = (10, 20)


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    return gguf_path()


@pytest.fixture(scope="session")
def gguf_files(smollm_gguf) -> ModelFiles:
    return ModelFiles.open(str(smollm_gguf))


@pytest.fixture
def dequantised(monkeypatch):
    """Every tensor the GGUF reader dequantises, as (shape, ggml type name)."""
    calls: list[tuple[tuple[int, ...], str]] = []
    real = gguf.dequantize

    def spy(data, qtype):
        calls.append((tuple(data.shape), qtype.name))
        return real(data, qtype)

    monkeypatch.setattr(gguf, "dequantize", spy)
    return calls


def test_span_equals_transformers_gguf_load(gguf_files, smollm_reference):
    span, _ = load_span(gguf_files, *SPAN, CPU, torch.float32)
    params = {k: v for k, v in span.state_dict().items() if k.startswith("layers.")}
    layers = smollm_reference.model.layers
    expected = {f"layers.{i - SPAN[0]}.{k}": v for i in range(*SPAN) for k, v in layers[i].state_dict().items()}
    assert params.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(params[key], value), key  # exact: same dequantisation, same Q/K un-permutation
    assert [layer.self_attn.layer_idx for layer in span.layers] == list(range(*SPAN))
    # and it computes the same: hidden states 10 -> 20 of the reference
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        hidden = smollm_reference(ids, output_hidden_states=True).hidden_states
        out = span(hidden[SPAN[0]], position_ids=torch.arange(ids.shape[1])[None])
    torch.testing.assert_close(out, hidden[SPAN[1]], rtol=1e-4, atol=1e-4)


def test_node_dequantises_only_its_layers(gguf_files, smollm_gguf, dequantised):
    header = gguf.read_header(smollm_gguf)
    span_tensors = [e for n, e in header.tensors.items() if gguf.layer_of(n) in range(*SPAN)]
    _, stats = load_span(gguf_files, *SPAN, CPU, torch.float32)
    assert len(dequantised) == stats.tensors == len(span_tensors) == 90  # 9 tensors a layer
    assert stats.bytes_read == sum(e.nbytes for e in span_tensors)
    assert stats.bytes_read < 0.3 * smollm_gguf.stat().st_size
    assert stats.shards == {smollm_gguf.name}


def test_client_dequantises_only_embeddings_norm_and_head(gguf_files, smollm_reference, dequantised):
    parts = load_client_parts(gguf_files, CPU, torch.float32)
    assert [name for _, name in dequantised] == ["Q8_0", "F32"]  # token_embd, output_norm; no output.weight
    assert parts.stats.tensors == 2
    assert parts.lm_head.weight is parts.embed_tokens.weight  # tied: the file has no output.weight
    assert torch.equal(parts.embed_tokens.weight, smollm_reference.model.embed_tokens.weight)
    assert torch.equal(parts.norm.weight, smollm_reference.model.norm.weight)


def test_config_and_tokenizer_come_from_the_file(gguf_files, smollm_gguf, tokenizer):
    config = gguf_files.config()
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert config_hash(config) == config_hash(ModelFiles.open(str(smollm_gguf)).config())  # node and client agree
    assert gguf_files.model_id == "SmolLM2-135M-Instruct.Q4_1"
    from_file = load_tokenizer(str(smollm_gguf))
    for prompt, chat in [("What is the capital of France?", True), ("Ünïcode 😀 and  spaces", False)]:
        assert encode_prompt(from_file, prompt, chat).tolist() == encode_prompt(tokenizer, prompt, chat).tolist()


def test_nodes_and_client_on_the_gguf_match_transformers(smollm_gguf, smollm_reference, tokenizer):
    from client import DistributedModelForCausalLM

    nodes = start_chain(smollm_gguf, 30, 2, threads=1)
    try:
        model = DistributedModelForCausalLM.from_pretrained(str(smollm_gguf), peers=[n.address for n in nodes])
        try:
            ids = encode_prompt(tokenizer, "What is the capital of France?", True)
            mask = torch.ones_like(ids)
            got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
            expected = smollm_reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
            expected = expected[0, ids.shape[1]:]
            assert got.tolist() == expected.tolist()
            assert tokenizer.decode(got, skip_special_tokens=True).startswith("The capital of France is Paris.")
            # served from the file, the Q4_1 matrices and the Q8_0 head are held as the blocks they were
            assert [codec.unpack_metadata(node_info(n.address).metadata)["exact"] for n in nodes] == [{"q4": 60}] * 2
            assert model.head_calls.fn.exact_weight().format == "q8"
        finally:
            model.close()
    finally:
        codes = [node.stop() for node in nodes]
    assert codes == [0, 0], "\n".join(n.log() for n in nodes)


# -- a tiny qwen2 GGUF (biases, untied head, no Q/K permutation), written here ----------------------

def _write_tiny_qwen2(path: Path, quantise: bool = True) -> None:
    import gguf as gguf_py
    from gguf.quants import quantize

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    writer = gguf_py.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(4)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(64)
    names = gguf_py.get_tensor_name_map(gguf_py.MODEL_ARCH.QWEN2, 4)
    for hf_name, tensor in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        values = tensor.numpy()
        if quantise and values.ndim == 2 and values.shape[1] % 32 == 0:  # matrices in Q8_0, vectors in F32
            writer.add_tensor(names.get_name(base) + "." + suffix, quantize(values, gguf_py.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf_py.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(names.get_name(base) + "." + suffix, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_tiny_qwen2_gguf_matches_transformers(tmp_path):
    path = tmp_path / "tiny-qwen2.Q8_0.gguf"
    _write_tiny_qwen2(path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    files = ModelFiles.open(str(path))
    assert files.config().model_type == "qwen2"
    fresh = tmp_path / "sidecar"  # the config written from the file's metadata, as on a first open
    gguf.ensure_config(gguf.read_header(path), fresh)
    assert config_hash(AutoConfig.from_pretrained(fresh)) == config_hash(files.config())
    span, stats = load_span(files, 1, 3, CPU, torch.float32)
    assert stats.tensors == 2 * 12  # 7 matrices, 3 biases, 2 norms a layer
    for i, layer in enumerate(span.layers):
        for key, value in reference.model.layers[1 + i].state_dict().items():
            assert torch.equal(layer.state_dict()[key], value), (1 + i, key)
    parts = load_client_parts(files, CPU, torch.float32)
    assert parts.lm_head.weight is not parts.embed_tokens.weight  # untied: output.weight is read
    assert torch.equal(parts.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(parts.embed_tokens.weight, reference.model.embed_tokens.weight)
    # the same model in other tensor types is other weights: another model in the swarm
    _write_tiny_qwen2(tmp_path / "tiny-qwen2.F32.gguf", quantise=False)
    assert config_hash(ModelFiles.open(str(tmp_path / "tiny-qwen2.F32.gguf")).config()) != config_hash(files.config())


# -- bad files ----------------------------------------------------------------------------------------

def test_corrupt_truncated_and_missing_files_are_refused(tmp_path, smollm_gguf):
    head = smollm_gguf.open("rb").read(4 * 2**20)  # the header and the first tensors, not the rest
    (tmp_path / "truncated.gguf").write_bytes(head)
    with pytest.raises(ModelLoadError, match="not a valid GGUF file.*truncated"):
        ModelFiles.open(str(tmp_path / "truncated.gguf"))
    (tmp_path / "cut-in-header.gguf").write_bytes(head[:100_000])
    with pytest.raises(ModelLoadError, match="not a valid GGUF file"):
        ModelFiles.open(str(tmp_path / "cut-in-header.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"this is not a model" * 10)
    with pytest.raises(ModelLoadError, match="magic"):
        ModelFiles.open(str(tmp_path / "junk.gguf"))
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        ModelFiles.open(str(tmp_path / "missing.gguf"))


def test_unsupported_architecture_is_named(tmp_path):
    import gguf as gguf_py

    path = tmp_path / "odd.gguf"
    writer = gguf_py.GGUFWriter(str(path), "rwkv7")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="architecture 'rwkv7' is not supported.*llama"):
        ModelFiles.open(str(path))


def test_cli_reports_a_corrupt_gguf_without_a_traceback(tmp_path, capsys):
    from node.cli.main import main

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    assert main(["generate", "--model", str(bad), "--peers", "127.0.0.1:1", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "potluck generate: error:" in err and "not a valid GGUF file" in err
    assert "Traceback" not in err
