"""LoRA adapters (node/model/lora.py): served per span, picked per session, equal to transformers + peft.

The references are the real `peft` library applied to the same tiny random models; the adapters'
B matrices are random (peft initialises them to zero, which would make every test pass trivially)."""

from __future__ import annotations

import json
import shutil
import threading

import grpc
import msgpack
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from client.routing import MissingLayersError
from common.weights.errors import ModelLoadError
from common.weights.fast_linear import transpose_linears
from common.weights.files import ModelFiles
from common.wire.generated import potluck_pb2 as pb
from common.wire.generated import potluck_pb2_grpc as pb_grpc
from node.launcher import NodeProcess
from node.model.lean import Row
from node.model.loader import load_span
from node.model.lora import load_adapter, parse_adapter_spec
from tests.support.swarm_fixtures import node_info

peft = pytest.importorskip("peft")

ATOL = 2e-4
LLAMA_ADAPTERS = {  # name -> (LoraConfig options, seed of the random B matrices)
    "alpha": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]), 1),
    "beta": (dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"down_proj": 2},
                  target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]), 2),
}


def _make_adapter(model_dir, folder, options: dict, seed: int) -> None:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(lora_dropout=0.0, **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def llama(tiny_model_dir, tmp_path_factory):
    """The tiny llama folder, two peft adapters for it, and a peft reference model holding both."""
    folder = tiny_model_dir("llama")
    adapters = {}
    for name, (options, seed) in LLAMA_ADAPTERS.items():
        adapters[name] = tmp_path_factory.mktemp(f"lora-{name}")
        _make_adapter(folder, adapters[name], options, seed)
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                               adapters["alpha"], adapter_name="alpha")
    reference.load_adapter(adapters["beta"], adapter_name="beta")
    return folder, adapters, reference.eval()


def _run(reference, adapter: str | None, ids: torch.Tensor) -> dict:
    """The reference's logits, each layer's input (("in", i)) and the last layer's output ("last"), for `adapter`
    (None: the base model, adapters off)."""
    caught = {}
    layers = reference.get_base_model().model.layers
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: caught.__setitem__(("in", i), args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(lambda module, args, out: caught.__setitem__("last", out)))
    try:
        with torch.no_grad():
            if adapter is None:
                with reference.disable_adapter():
                    caught["logits"] = reference(ids).logits
            else:
                reference.set_adapter(adapter)
                caught["logits"] = reference(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return caught


def _greedy(reference, adapter: str | None, ids: torch.Tensor, new: int) -> torch.Tensor:
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                return reference.generate(ids, max_new_tokens=new, do_sample=False)
        reference.set_adapter(adapter)
        return reference.generate(ids, max_new_tokens=new, do_sample=False)


def _span(folder, start: int, end: int, lean: bool):
    span, _ = load_span(ModelFiles.open(str(folder)), start, end, torch.device("cpu"), torch.float32)
    transpose_linears(span)
    if lean:
        assert span.make_lean() is None
    return span


IDS = torch.tensor([[5, 17, 240, 33, 101, 7, 460, 12, 9]])


# -- the span: plain torch ------------------------------------------------------------------------
def test_one_lean_pass_mixes_adapters_and_the_base_model_per_row(llama):
    folder, adapters, reference = llama
    span = _span(folder, 2, 4, lean=True)
    loaded = {name: load_adapter(name, str(path), span) for name, path in adapters.items()}
    runs = {name: _run(reference, name, IDS) for name in (None, "alpha", "beta")}
    rows, expected = [], []
    for name, tokens in ((None, 9), ("alpha", 9), ("beta", 9), ("alpha", 4)):  # alpha twice: not contiguous
        x = runs[name][("in", 2)][:, :tokens]
        rows.append(Row(x, torch.arange(tokens)[None], 0, span.new_cache(1, 16), None, loaded.get(name)))
        expected.append(runs[name][("in", 4)][:, :tokens])
    with torch.inference_mode():
        outputs = span.lean.run(rows, 2, 4)
    for out, want in zip(outputs, expected):
        torch.testing.assert_close(out, want, atol=ATOL, rtol=1e-4)
    assert (expected[0] - expected[1]).abs().max() > 0.1  # the adapters change the layers' outputs


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_generic_path_applies_an_adapter_with_hooks_for_one_call(family, llama, tiny_model_dir, tmp_path):
    """transformers' own layers (--no-lean, and families without a lean runtime such as Mixtral's MoE)."""
    folder = tiny_model_dir(family)
    if family == "llama":
        adapter_dir, reference = llama[1]["alpha"], llama[2]
        name = "alpha"
    else:  # the experts are fused 3D parameters, not linear layers: adapt the attention
        adapter_dir, name = tmp_path / "attn", "attn"
        _make_adapter(folder, adapter_dir, dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"]), 3)
        reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                                   adapter_dir, adapter_name=name).eval()
    span = _span(folder, 1, 4, lean=False)
    adapter = load_adapter(name, str(adapter_dir), span)
    run, base = _run(reference, name, IDS), _run(reference, None, IDS)
    positions = torch.arange(IDS.shape[1])[None]
    with torch.inference_mode():
        out = span(run[("in", 1)], positions, None, span.new_cache(), adapter=adapter)
        plain = span(base[("in", 1)], positions, None, span.new_cache())
    torch.testing.assert_close(out, run[("in", 4)], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(plain, base[("in", 4)], atol=ATOL, rtol=1e-4)  # the hooks are gone again
    assert not any(module._forward_hooks for module in span.modules())


def _edited_copy(source, tmp_path, config_changes=None, tensors=None):
    folder = tmp_path / "edited"
    shutil.copytree(source, folder)
    if config_changes:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(config_changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    if tensors:
        weights = load_file(folder / "adapter_model.safetensors")
        weights.update(tensors(weights))
        save_file(weights, folder / "adapter_model.safetensors")
    return folder


LAYER = "base_model.model.model.layers.{}.mlp.down_proj"


@pytest.mark.parametrize("config_changes, tensors, fragment", [
    ({"use_dora": True}, None, "DoRA"),
    ({"bias": "all"}, None, "bias='all'"),
    ({"alpha_pattern": {"q_proj": 4}}, None, "alpha_pattern"),
    ({"peft_type": "IA3"}, None, "only LORA"),
    (None, lambda w: {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 512)}, "embeddings"),
    (None, lambda w: {LAYER.format(2) + ".weight": torch.zeros(64, 128)}, "replaces a weight of layer 2"),
    (None, lambda w: {LAYER.format(3) + ".lora_A.weight": torch.zeros(4, 96)}, "update 128->64 expected"),
    (None, lambda w: {"base_model.model.model.layers.2.mlp.act_fn.lora_A.weight": torch.zeros(4, 64),
                      "base_model.model.model.layers.2.mlp.act_fn.lora_B.weight": torch.zeros(64, 4)}, "lean runtime"),
])
def test_unsupported_adapters_are_refused_clearly(llama, tmp_path, config_changes, tensors, fragment):
    folder, adapters, _ = llama
    edited = _edited_copy(adapters["alpha"], tmp_path, config_changes, tensors)
    with pytest.raises(ModelLoadError, match="adapter 'x'") as error:
        load_adapter("x", str(edited), _span(folder, 2, 4, lean=True))
    assert fragment in str(error.value)


def test_only_the_spans_tensors_are_kept_and_other_layers_may_differ(llama, tmp_path):
    folder, adapters, _ = llama
    # a full weight of layer 5 (modules_to_save) does not concern a node serving 2:4
    edited = _edited_copy(adapters["alpha"], tmp_path, None,
                          lambda w: {LAYER.format(5) + ".weight": torch.zeros(64, 128)})
    adapter = load_adapter("x", str(edited), _span(folder, 2, 4, lean=True))
    assert {layer for layer, _ in adapter.pairs} == {2, 3}
    assert {path for _, path in adapter.pairs} == {"self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                   "mlp.gate_proj", "mlp.down_proj"}


def test_adapter_flags_and_names():
    assert parse_adapter_spec("chat=/models/lora-chat") == ("chat", "/models/lora-chat")
    for bad in ("chat", "=/x", "a b=/x", "chat="):
        with pytest.raises(ValueError):
            parse_adapter_spec(bad)


def test_join_takes_adapters_from_flags_and_the_config_file(tmp_path):
    from node.cli.join import _adapter_specs, join_args
    from node.config import ConfigError, NodeConfig

    path = tmp_path / "node.toml"
    path.write_text('model = "m"\nadapter = ["a=/x", "b=org/lora"]\n')
    assert _adapter_specs(join_args(["--config", str(path)]).adapter) == (("a", "/x"), ("b", "org/lora"))
    assert _adapter_specs(join_args(["--model", "m", "--adapter", "c=/y"]).adapter) == (("c", "/y"),)
    with pytest.raises(ConfigError, match="given twice"):
        NodeConfig(model="m", adapters=(("a", "/x"), ("a", "/y")))
    with pytest.raises(ConfigError, match="adapter name"):
        NodeConfig(model="m", adapters=(("-a", "/x"),))


def test_records_carry_adapter_names_and_old_records_have_none():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.swarm.records import PeerRecord, RecordError, node_id_of, sign_record, verify_record

    key = Ed25519PrivateKey.generate()
    record = PeerRecord(node_id=node_id_of(key.public_key().public_bytes_raw()), addresses=("10.0.0.1:1",),
                        model_id="m", config_hash="c", num_layers=6, start=0, end=6, issued_at=1e9,
                        expires_at=1e9 + 60, seq=1, adapters=("alpha", "beta"))
    assert verify_record(sign_record(record, key), now=1e9).adapters == ("alpha", "beta")
    data = record.to_payload()
    del data["adapters"]
    payload = msgpack.packb(data, use_bin_type=True)
    from common.swarm.records import SignedRecord

    old = SignedRecord(payload, key.public_key().public_bytes_raw(), key.sign(payload))
    assert verify_record(old, now=1e9).adapters == ()
    data["adapters"] = ["x" * 65]
    payload = msgpack.packb(data, use_bin_type=True)
    with pytest.raises(RecordError, match="adapters"):
        verify_record(SignedRecord(payload, key.public_key().public_bytes_raw(), key.sign(payload)), now=1e9)


def test_status_lists_each_nodes_adapters():
    import io
    import time

    from rich.console import Console

    from client.status import as_json, group_by_model, render
    from common.swarm.records import NodeState, PeerRecord

    now = time.time()
    records = [PeerRecord(node_id=f"{i:064x}", addresses=(f"10.0.0.{i}:1",), model_id="m", config_hash="c",
                          num_layers=6, start=0, end=6, issued_at=now, expires_at=now + 60, seq=1,
                          state=NodeState.ONLINE, adapters=adapters)
               for i, adapters in enumerate([("alpha", "beta"), ()], 1)]
    views = group_by_model(records)
    listed = {node["address"]: node["adapters"] for node in as_json(views)["models"][0]["nodes"]}
    assert listed == {"10.0.0.1:1": ["alpha", "beta"], "10.0.0.2:1": []}
    out = io.StringIO()
    render(views, Console(file=out, width=200))
    assert "alpha,beta" in out.getvalue() and "adapters" in out.getvalue()


# -- through real nodes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_nodes(llama, bg_loop, tmp_path_factory):
    """Two node processes serving 0:3 and 3:6 with both adapters, and an in-process node serving 0:6
    without any (cheaper for a client that needs no adapter: routing must avoid it for one that does)."""
    folder, adapters, _ = llama
    ids = tmp_path_factory.mktemp("lora-ids")
    flags = [arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")]
    processes = [NodeProcess(folder, a, b, extra_args=("--no-mdns", "--threads", "1", "--throughput", "100",
                                                       "--identity", str(ids / f"{a}.pem"), *flags)).start()
                 for a, b in ((0, 3), (3, 6))]
    plain = bg_loop.start_node(folder, 0, 6, throughput=1000.0)  # the cheapest route when it may be used
    try:
        addresses = [process.wait_ready(120) for process in processes]
        yield addresses, plain.address
    finally:
        codes = [process.stop() for process in processes]
        bg_loop.stop_node(plain)
    assert codes == [0, 0], "\n".join(process.log() for process in processes)


def _client(folder, peers, adapter=None, **options):
    from client import DistributedModelForCausalLM

    return DistributedModelForCausalLM.from_pretrained(str(folder), peers=peers, adapter=adapter, **options)


def test_nodes_advertise_their_adapters(lora_nodes):
    addresses, plain = lora_nodes
    for address in addresses:
        assert msgpack.unpackb(node_info(address).metadata)["adapters"] == ["alpha", "beta"]
    assert msgpack.unpackb(node_info(plain).metadata)["adapters"] == []


@pytest.mark.parametrize("adapter", ["alpha", "beta", None])
def test_generation_through_nodes_equals_peft(llama, lora_nodes, adapter):
    """Greedy tokens, a session's logits (pushed steps) and stateless Forward logits, each as peft computes them;
    routing avoids the node without the adapter (and takes it, one hop, for the base model)."""
    folder, _, reference = llama
    addresses, plain = lora_nodes
    model = _client(folder, [*addresses, plain], adapter)
    try:
        out = model.generate(IDS, max_new_tokens=6, do_sample=False)
        assert torch.equal(out, _greedy(reference, adapter, IDS, 6))
        route = [hop.peer.address for hop in model.last_session.route]
        assert route == ([plain] if adapter is None else addresses)
        want = _run(reference, adapter, IDS)["logits"]
        with torch.inference_mode():
            torch.testing.assert_close(model(IDS).logits, want, atol=ATOL, rtol=1e-4)  # Forward RPC
    finally:
        model.close()


def test_concurrent_sessions_with_different_adapters_on_the_same_nodes(llama, lora_nodes):
    """Sessions with alpha, beta and no adapter at once on the two adapter nodes: each gets its own arithmetic
    (the nodes batch steps that arrive together into one pass)."""
    folder, _, reference = llama
    addresses, _ = lora_nodes
    models = {name: _client(folder, addresses, name) for name in ("alpha", "beta", None)}
    try:
        runs = {name: _run(reference, name, IDS) for name in models}
        sessions = {name: model.inference_session(max_length=32) for name, model in models.items()}
        results, errors = {}, []

        def step(name):
            try:
                with torch.inference_mode():  # per thread
                    embeds = models[name].embed_tokens(IDS)
                    results[name] = [sessions[name].step(embeds[:, :5]), sessions[name].step(embeds[:, 5:])]
            except Exception as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=step, args=(name,)) for name in models]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        for name, (first, second) in results.items():
            torch.testing.assert_close(torch.cat([first, second], dim=1), runs[name]["last"], atol=ATOL, rtol=1e-4)
        for session in sessions.values():
            session.close()
    finally:
        for model in models.values():
            model.close()


def test_an_unknown_adapter_is_refused_clearly(llama, lora_nodes):
    folder, _, _ = llama
    addresses, plain = lora_nodes
    with pytest.raises(MissingLayersError, match="with adapter 'gamma' \\(no node serves it\\)"):
        _client(folder, [*addresses, plain], "gamma")
    with grpc.insecure_channel(addresses[0]) as channel:
        call = pb_grpc.PotluckStub(channel).Inference(iter([pb.SessionRequest(open=pb.OpenSession(
            session_id="s", start=0, end=3, max_length=8, batch_size=1, wire_dtype="float32",
            metadata=msgpack.packb({"adapter": "gamma"})))]), timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            list(call)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "adapter 'gamma' is not served by this node (its adapters: alpha, beta)" in error.value.details()
    assert node_info(addresses[0]).start == 0  # still serving


def test_failover_replays_with_the_sessions_adapter(llama, bg_loop, tiny_model_dir):
    """The hop serving 3:6 dies after the prompt: its replacement is rebuilt from the history with the adapter."""
    folder, adapters, reference = llama
    spec = (("alpha", str(adapters["alpha"])),)
    nodes = [bg_loop.start_node(folder, a, b, throughput=100.0, adapters=spec) for a, b in ((0, 3), (3, 6), (3, 6))]
    model = _client(folder, [n.address for n in nodes], "alpha", push=False)
    try:
        from client.model import RemoteCache

        want = _greedy(reference, "alpha", IDS, 4)
        with model.inference_session(max_length=32) as session, torch.inference_mode():
            ids, logits = IDS, []
            for step in range(4):
                logits.append(model(ids if step == 0 else ids[:, -1:], cache=RemoteCache(session)).logits)
                ids = torch.cat([ids, logits[-1][:, -1:].argmax(-1)], dim=1)
                if step == 0:
                    victim = next(n for n in nodes if n.address == session.route[-1].peer.address)
                    bg_loop.stop_node(victim)
            assert len(session.events) == 1
        assert torch.equal(ids, want)
        torch.testing.assert_close(torch.cat(logits, dim=1), _run(reference, "alpha", ids[:, :-1])["logits"],
                                   atol=ATOL, rtol=1e-4)
    finally:
        model.close()
        for node in nodes:
            if node in bg_loop.running:
                bg_loop.stop_node(node)


def test_the_api_serves_model_colon_adapter(llama, lora_nodes, tokenizer):
    """`potluck api`: the model name `MODEL:ADAPTER` runs MODEL with a LoRA adapter its nodes serve."""
    import httpx

    from client.api import create_app
    from tests.e2e.test_api import ApiServer

    folder, _, reference = llama
    addresses, plain = lora_nodes
    base = _client(folder, [*addresses, plain])
    api = ApiServer(create_app({"tiny": base}, tokenizer))  # the SmolLM2 tokenizer: its ids cover the tiny vocabulary
    try:
        body = {"model": "tiny:alpha", "prompt": IDS[0].tolist(), "max_tokens": 5, "temperature": 0}
        reply = httpx.post(api.url + "/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        expected = _greedy(reference, "alpha", IDS, 5)[0, IDS.shape[1]:]
        assert reply.json()["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert reply.json()["model"] == "tiny:alpha"
        listed = [card["id"] for card in httpx.get(api.url + "/models", timeout=60).json()["data"]]
        assert listed == ["tiny", "tiny:alpha", "tiny:beta"]  # the adapters every layer is served with
        assert httpx.get(api.url + "/models/tiny:beta", timeout=60).json()["id"] == "tiny:beta"
        assert httpx.get(api.url + "/models/tiny:gamma", timeout=60).status_code == 404
        missing = httpx.post(api.url + "/completions", json={**body, "model": "tiny:gamma"}, timeout=60)
        assert missing.status_code == 404 and "tiny:gamma" in missing.text
    finally:
        api.stop()
        base.close()
