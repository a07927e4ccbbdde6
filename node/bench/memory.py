"""`potluck bench-memory`: what a node process holds, against what its span needs.

Each case starts a real `potluck join` process and reads its memory from the outside (/proc/<pid>/status: VmHWM is
the peak, VmRSS the resident memory now) and from its Info (node/metrics.py MemoryView: the weights as held, the KV
cache as allocated, the runtime baseline measured before any weight was read). A short session (a prefill and a few
decode steps) runs first, so the final memory includes a cache in use. Targets (docs/memory.md): peak <= 1.15 x
final, final <= 1.1 x weights + cache + baseline.

`--eight-b` instead serves a Llama-3.1-8B-shaped bfloat16 checkpoint from one machine, beside llama.cpp on the same
weights (node/bench/memory_8b.py)."""

from __future__ import annotations

import json
import queue
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

MARK_START = "<!-- bench:memory:start -->"
MARK_END = "<!-- bench:memory:end -->"
MiB = 2**20


@dataclass(frozen=True)
class MemoryCase:
    """One process's memory: bytes."""

    name: str
    span: str
    weights: int   # the span's weights as held (stored forms), from the node's Info
    kv_cache: int  # KV cache allocated at the end, from the node's Info
    baseline: int  # runtime before any weight was read, from the node's Info
    peak: int      # VmHWM
    final: int     # VmRSS after the session
    tokens_per_s: float = 0.0

    @property
    def peak_ratio(self) -> float:
        return self.peak / self.final

    @property
    def final_ratio(self) -> float:
        """final / (weights + cache + baseline)."""
        return self.final / max(self.weights + self.kv_cache + self.baseline, 1)


# -- checkpoints --------------------------------------------------------------------------------------
def llama_config(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, vocab: int,
                 tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(architectures=["LlamaForCausalLM"],  # llama.cpp's converter reads the family from it
                       vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       dtype="bfloat16")


ONE_B = dict(hidden=2048, layers=16, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tie=True)


def write_checkpoint(folder: Path, config, shards: int, seed: int = 0) -> Path:
    """Random bfloat16 weights for `config` in `shards` safetensors files with an index, written one shard at a time
    (never the whole model in memory: an 8B checkpoint is written in ~3 GB)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()
              if not (name == "lm_head.weight" and config.tie_word_embeddings)}
    total = sum(torch.Size(shape).numel() * 2 for shape in shapes.values())
    per_shard = -(-total // shards)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if size >= per_shard and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += torch.Size(shape).numel() * 2
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for number, names in enumerate(groups, 1):
        filename = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _random(shapes[name], generator) for name in names}
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, filename))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    return folder


def _random(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Normal(0, 0.02) bf16 values (norm weights: 1 + small noise), made in row chunks (no whole float32 copy)."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    if len(shape) == 1:
        out.copy_(1.0 + 0.02 * torch.randn(shape, generator=generator))
        return out
    rows = max(1, (1 << 24) // max(shape[-1], 1))
    for start in range(0, shape[0], rows):
        part = out[start : start + rows]
        part.copy_(torch.randn(part.shape, generator=generator) * 0.02)
    return out


# -- measuring ----------------------------------------------------------------------------------------
def node_memory(address: str) -> dict[str, int]:
    """A node's memory parts from its Info."""
    import grpc

    from client.transport import memory_parts
    from common.wire import codec
    from common.wire.generated import potluck_pb2 as pb
    from common.wire.generated import potluck_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.PotluckStub(channel).Info(pb.InfoRequest(), timeout=10)
    return dict(memory_parts(codec.unpack_metadata(reply.metadata).get("memory")))


def run_session(address: str, start: int, end: int, hidden: int, prompt: int = 32, steps: int = 8) -> None:
    """A prefill of `prompt` random hidden states and `steps` decode steps through the node's span (left open while
    the caller measures: returns the close function)."""
    import grpc

    from common.wire import codec
    from common.wire.generated import potluck_pb2 as pb
    from common.wire.generated import potluck_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    outbox: queue.Queue = queue.Queue()
    replies = pb_grpc.PotluckStub(channel).Inference(iter(outbox.get, None), timeout=600)
    outbox.put(pb.SessionRequest(open=pb.OpenSession(session_id="bench-memory", start=start, end=end,
                                                     max_length=prompt + steps + 1, batch_size=1,
                                                     wire_dtype="float32")))
    next(replies)
    position = 0
    for tokens in [prompt] + [1] * steps:
        hidden_states = torch.randn(1, tokens, hidden) * 0.1
        outbox.put(pb.SessionRequest(step=pb.Step(hidden=codec.encode_tensor(hidden_states), position=position)))
        next(replies)
        position += tokens

    def close() -> None:
        outbox.put(pb.SessionRequest(close=pb.CloseSession()))
        outbox.put(None)
        list(replies)
        channel.close()

    return close


def measure_node(name: str, model: Path, start: int, end: int, flags: tuple[str, ...] = (), threads: int = 1,
                 session: bool = True) -> MemoryCase:
    """Start a node serving `start:end` of `model`, run a short session, and read its memory."""
    from common.weights.files import ModelFiles
    from node.launcher import NodeProcess
    from node.metrics import process_memory

    hidden = ModelFiles.open(str(model)).config().hidden_size
    node = NodeProcess(model, start, end, threads=threads,
                       extra_args=("--no-mdns", "--throughput", "10", *flags)).start()
    try:
        address = node.wait_ready(600)
        close = run_session(address, start, end, hidden) if session else (lambda: None)
        try:
            parts = node_memory(address)
            final, peak = process_memory(node.process.pid)
        finally:
            close()
    finally:
        node.stop()
    return MemoryCase(name, f"{start}:{end}", parts["weights"], parts["kv_cache"], parts["baseline"], peak, final)


def measure_swarm(name: str, model: Path, parts: int, new_tokens: int = 16, threads: int = 1,
                  client_dtype: str = "float32", console: Console | None = None) -> list[MemoryCase]:
    """`parts` node processes over the whole model and a client in this process (its local parts in `client_dtype`):
    each node's memory after greedy generations, the client's, and the decode tokens/s: (new_tokens - 1) over the
    time `new_tokens` tokens took less the time 1 token took (the same prompt: the prefill cancels out)."""
    from client.config import ClientConfig
    from client.model import DistributedModelForCausalLM
    from common.weights.files import ModelFiles
    from node.launcher import NodeProcess, even_spans
    from node.metrics import process_memory

    config = ModelFiles.open(str(model)).config()
    spans = even_spans(config.num_hidden_layers, parts)
    nodes = [NodeProcess(model, a, b, threads=threads, extra_args=("--no-mdns", "--throughput", "10")).start()
             for a, b in spans]
    try:
        peers = tuple(node.wait_ready(3600) for node in nodes)
        if console is not None:
            console.print(f"{len(peers)} nodes ready; loading the client")
        client = DistributedModelForCausalLM.from_pretrained(
            str(model), config=ClientConfig(peers=peers, mdns=False, dtype=client_dtype))
        try:
            ids = torch.randint(3, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
            times = {}
            for count in (1, new_tokens):
                started = time.perf_counter()
                out = client.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
                times[count] = time.perf_counter() - started
                if console is not None:
                    console.print(f"{out.shape[1] - ids.shape[1]} tokens in {times[count]:.1f} s")
            rate = (new_tokens - 1) / max(times[new_tokens] - times[1], 1e-9)
            cases = []
            for node, address, (a, b) in zip(nodes, peers, spans):
                mem = node_memory(address)
                final, peak = process_memory(node.process.pid)
                cases.append(MemoryCase(f"{name} node", f"{a}:{b}", mem["weights"], mem["kv_cache"], mem["baseline"],
                                        peak, final, rate))
            final, peak = process_memory()
            cases.append(MemoryCase(f"{name} client (bench process)", f"embeddings + head, {client_dtype}", 0, 0, 0,
                                    peak, final, rate))
            return cases
        finally:
            client.close()
    finally:
        for node in nodes:
            node.stop()


def run_memory_bench(smollm: Path | None, gguf: Path | None, one_b: bool, workdir: Path,
                     console: Console | None = None) -> list[MemoryCase]:
    console = console or Console(stderr=True)
    cases: list[MemoryCase] = []
    if smollm is not None:
        console.print("SmolLM2 folder, layers 10:20")
        cases.append(measure_node("SmolLM2-135M folder", smollm, 10, 20))
        console.print("SmolLM2 folder, layers 10:20, --quant int8")
        cases.append(measure_node("SmolLM2-135M folder, --quant int8", smollm, 10, 20, ("--quant", "int8")))
    if gguf is not None:
        console.print("SmolLM2 GGUF, layers 10:20")
        cases.append(measure_node(f"SmolLM2-135M {gguf.name}", gguf.parent / gguf.name, 10, 20))
    if one_b:
        folder = workdir / "llama-1b-shaped-bf16"
        console.print(f"writing a Llama-3.2-1B-shaped bf16 checkpoint into {folder}")
        write_checkpoint(folder, llama_config(**ONE_B), shards=6)
        for span in ((0, 6), (6, 11)):
            cases.append(measure_node("Llama-3.2-1B-shaped bf16 (6 shards)", folder, *span))
        cases.append(measure_node("Llama-3.2-1B-shaped bf16, --quant int8", folder, 0, 6, ("--quant", "int8")))
    return cases


def render_markdown(cases: list[MemoryCase], command: str) -> str:
    lines = [
        "## Node memory (`potluck bench-memory`)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: `{command}`",
        "- one `potluck join` process per row (`--no-mdns --throughput 10 --threads 1`), after a 32-token prefill and "
        "8 decode steps through its span; *weights*: the span as held (stored forms), *cache*: KV cache allocated, "
        "*baseline*: the process before it read any weight (all three from the node's Info), *peak*: VmHWM, "
        "*final*: VmRSS at the end (/proc/<pid>/status). Targets: peak <= 1.15 x final; "
        "final <= 1.1 x (weights + cache + baseline). MiB = 2^20 bytes.",
        "",
        "| case | span | weights MiB | cache MiB | baseline MiB | peak MiB | final MiB | peak / final | "
        "final / (w + c + b) | tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        rate = f"{c.tokens_per_s:.2f}" if c.tokens_per_s else "-"
        lines.append(f"| {c.name} | {c.span} | {c.weights / MiB:.1f} | {c.kv_cache / MiB:.1f} | "
                     f"{c.baseline / MiB:.1f} | {c.peak / MiB:.1f} | {c.final / MiB:.1f} | {c.peak_ratio:.3f} | "
                     f"{c.final_ratio:.3f} | {rate} |")
    return "\n".join(lines) + "\n"
