"""`potluck finetune`: train a soft prompt through the swarm on a JSONL file, and the prompt files it writes
(`potluck generate --prompt-weights`). The nodes' layers stay frozen and remote (docs/finetune.md).

Data: one JSON object a line, either {"text": ...} (loss on every token) or {"prompt": ..., "completion": ...}
(loss on the completion only; an end-of-sequence token is appended to it)."""

from __future__ import annotations

import argparse
import json
import math
import pickle
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

FILE_FORMAT = "potluck-prompt/1"  # the `format` key of prompt files
IGNORE = -100                     # labels transformers' loss skips


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken (the prompt of a prompt/completion pair)


def read_examples(path: str, tokenizer, max_length: int) -> list[Example]:
    """The examples of a JSONL file, tokenised and cut to `max_length` tokens. ValueError naming the line if
    one is not a JSON object with "text" or "prompt" and "completion" strings, or leaves nothing to learn."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--data {path}: {error}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--data {path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error.msg})") from None
        examples.append(_example(record, tokenizer, max_length, where))
    if not examples:
        raise ValueError(f"--data {path}: no examples (expected JSON lines with \"text\", or \"prompt\" and \"completion\")")
    return examples


def _example(record, tokenizer, max_length: int, where: str) -> Example:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        ids = tokenizer(record["text"]).input_ids[:max_length]
        labels = list(ids)
    elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        prompt = tokenizer(record["prompt"]).input_ids
        completion = tokenizer(record["completion"], add_special_tokens=False).input_ids
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
        ids = (prompt + completion)[:max_length]
        labels = ([IGNORE] * len(prompt) + completion)[:max_length]
    else:
        raise ValueError(f'{where}: expected an object with a "text" string, or "prompt" and "completion" strings')
    if sum(label != IGNORE for label in labels[1:]) == 0:
        raise ValueError(f"{where}: nothing to learn (fewer than 2 tokens, or the completion is cut off by --max-length)")
    return Example(ids, labels)


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels [batch, longest], padded on the right: causal attention keeps the real tokens from
    seeing the padding, so no mask is needed, and the padding's labels are IGNORE."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return ids, labels


def batches(examples: list[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless batches: the examples shuffled (seeded), epoch after epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for begin in range(0, len(order), batch_size):
            yield [examples[i] for i in order[begin : begin + batch_size]]


@dataclass
class TrainResult:
    losses: list[float]
    seconds: float
    bytes_sent: int
    bytes_received: int
    failovers: int


def train(model, examples: list[Example], steps: int, lr: float, batch_size: int, pad_id: int, seed: int = 0,
          on_step=None) -> TrainResult:
    """`steps` AdamW steps on the model's prompts (model.add_prompts first); `on_step(step, loss)` after each."""
    params = [p for p in (model.prompt_embeddings, getattr(model, "intermediate_prompts", None)) if p is not None]
    optimizer = torch.optim.AdamW(params, lr=lr)
    stats = model.swarm.train_stats
    sent, received, failovers = stats.bytes_sent, stats.bytes_received, stats.failovers
    losses, started, source = [], time.perf_counter(), batches(examples, batch_size, seed)
    for step in range(1, steps + 1):
        ids, labels = collate(next(source), pad_id)
        optimizer.zero_grad()
        loss = model(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return TrainResult(losses, time.perf_counter() - started, stats.bytes_sent - sent, stats.bytes_received - received,
                       stats.failovers - failovers)


# -- prompt files -------------------------------------------------------------------------------------
def save_prompts(model, path: str, extra: dict | None = None) -> None:
    tensors = {"prompt_embeddings": model.prompt_embeddings.detach().cpu().clone()}
    if model.tuning == "deep_ptune":
        tensors["intermediate_prompts"] = model.intermediate_prompts.detach().cpu().clone()
    torch.save({"format": FILE_FORMAT, "method": model.tuning, "num_prompt_tokens": model.prompt_embeddings.shape[0],
                "config_hash": model.swarm.config_hash, "model": model.name_or_path, "tensors": tensors, **(extra or {})},
               path)


def load_prompts(model, path: str) -> dict:
    """Put the prompts of the file at `path` on `model` (for generation; ptune or deep_ptune). ValueError with a
    one-line reason if the file is not a prompt file or was trained for another model."""
    where = f"--prompt-weights {path}"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
        raise ValueError(f"{where}: cannot read it ({str(error).splitlines()[0]})") from None
    if not isinstance(saved, dict) or saved.get("format") != FILE_FORMAT:
        raise ValueError(f"{where}: not a prompt file written by `potluck finetune`")
    if saved["config_hash"] != model.swarm.config_hash:
        raise ValueError(f"{where}: trained for another model ({saved.get('model')}, config {saved['config_hash']}), "
                         f"not {model.name_or_path} (config {model.swarm.config_hash})")
    method = saved.get("method")
    if method not in ("ptune", "deep_ptune"):
        raise ValueError(f"{where}: unknown method {method!r} (expected ptune or deep_ptune)")
    count, hidden = saved["num_prompt_tokens"], model.config.hidden_size
    expected = {"prompt_embeddings": (count, hidden)}
    if method == "deep_ptune":
        expected["intermediate_prompts"] = (model.config.num_hidden_layers, count, hidden)
    for name, shape in expected.items():
        tensor = saved["tensors"].get(name)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else "nothing"
            raise ValueError(f"{where}: {name} has shape {found}, expected {shape}")
    model.add_prompts(method, count)
    with torch.no_grad():
        model.prompt_embeddings.copy_(saved["tensors"]["prompt_embeddings"])
        if method == "deep_ptune":
            model.intermediate_prompts.copy_(saved["tensors"]["intermediate_prompts"])
    return saved


def plot_losses(losses: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(losses) + 1), losses, marker="." if len(losses) <= 50 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- potluck finetune ---------------------------------------------------------------------------------
def add_finetune_parser(commands) -> None:
    from node.cli import _add_logging, _add_swarm_args, _positive, add_trust_args

    parser = commands.add_parser("finetune", help="train a soft prompt through the swarm (the nodes' layers stay frozen)")
    parser.add_argument("--model", required=True, help="model folder, .gguf file or hub id (the one the nodes serve)")
    parser.add_argument("--data", required=True,
                        help='JSONL file: {"text": ...} or {"prompt": ..., "completion": ...} a line (docs/finetune.md)')
    parser.add_argument("--method", default="ptune", choices=["ptune", "deep_ptune"],
                        help="ptune: prompt embeddings before the input; deep_ptune: also prompts at every layer")
    parser.add_argument("--steps", type=_positive, required=True, help="optimizer steps")
    parser.add_argument("--out", required=True, help="where to save the prompt (torch file, for generate --prompt-weights)")
    parser.add_argument("--num-prompt-tokens", type=_positive, default=16, help="soft prompt tokens (default 16)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 0.01)")
    parser.add_argument("--batch-size", type=_positive, default=4, help="examples per step (default 4)")
    parser.add_argument("--max-length", type=_positive, default=256, help="tokens per example at most (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt's initialisation and the shuffling")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also draw the loss curve to this PNG (needs matplotlib)")
    parser.add_argument("--peers", default=None, help="comma-separated HOST:PORT of nodes (default: discover them)")
    parser.add_argument("--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
                        help="activations and gradients on the wire (default float32)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary, not the loss of every step")
    _add_swarm_args(parser)
    add_trust_args(parser)
    _add_logging(parser)


@contextmanager
def _loss_bar(enabled: bool, total: int):
    """A rich progress bar with the last loss (node/progress.py's style), only when `enabled`."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("training", total=total, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.4f}")


def run_finetune_cli(args: argparse.Namespace) -> None:
    from client.config import ClientConfig
    from client.model import DistributedModelForCausalLM
    from client.textgen import load_tokenizer
    from node.cli import ConfigError, bootstrap_list, trust_options

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib (pip install matplotlib), or leave --plot out") from None
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ConfigError(f"--lr {args.lr}: expected a positive number")
    tokenizer = load_tokenizer(args.model)
    try:
        examples = read_examples(args.data, tokenizer, args.max_length)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    peers = tuple(p.strip() for p in (args.peers or "").split(",") if p.strip())
    config = ClientConfig(peers=peers, bootstrap=bootstrap_list(args.bootstrap), mdns=not args.no_mdns,
                          mdns_interface=args.mdns_interface, wire_dtype=args.wire_dtype, **trust_options(args))
    model = DistributedModelForCausalLM.from_pretrained(args.model, config=config)
    try:
        torch.manual_seed(args.seed)
        model.add_prompts(args.method, args.num_prompt_tokens)

        with _loss_bar(sys.stderr.isatty(), args.steps) as show:
            def on_step(step: int, loss: float) -> None:
                show(loss)
                if not args.quiet:
                    print(f"step {step:>{len(str(args.steps))}}/{args.steps}  loss {loss:.4f}", flush=True)

            result = train(model, examples, args.steps, args.lr, args.batch_size, pad_id, args.seed, on_step)
        save_prompts(model, args.out, {"losses": result.losses, "steps": args.steps, "lr": args.lr})
    finally:
        model.close()
    losses = result.losses
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps ({len(examples)} examples, "
          f"{result.seconds:.1f} s); per step {result.bytes_sent / len(losses) / 1e6:.2f} MB sent, "
          f"{result.bytes_received / len(losses) / 1e6:.2f} MB received"
          + (f"; {result.failovers} failovers" if result.failovers else ""))
    print(f"saved the {args.method} prompt ({args.num_prompt_tokens} tokens) to {args.out}")
    if args.plot:
        plot_losses(losses, args.plot, f"{args.method}, {args.num_prompt_tokens} prompt tokens, lr {args.lr}")
        print(f"loss curve: {args.plot}")
