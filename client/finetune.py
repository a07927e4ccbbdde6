"""`potluck finetune`: train a soft prompt through the swarm on a JSONL file, and the prompt files it writes
(`potluck generate --prompt-weights`). The nodes' layers stay frozen and remote (docs/finetune.md).

Data: one JSON object a line, either {"text": ...} (loss on every token) or {"prompt": ..., "completion": ...}
(loss on the completion only; an end-of-sequence token is appended to it)."""

from __future__ import annotations

import json
import random
import re
import time
import warnings
from collections.abc import Iterator
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
        raise ValueError(f'--data {path}: no examples (expected JSON lines with "text", or "prompt" and "completion")')
    return examples


def _example(record, tokenizer, max_length: int, where: str) -> Example:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        ids = tokenizer(record["text"]).input_ids[:max_length]
        labels = list(ids)
    elif (
        isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)
    ):
        prompt = tokenizer(record["prompt"]).input_ids
        completion = tokenizer(record["completion"], add_special_tokens=False).input_ids
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
        ids = (prompt + completion)[:max_length]
        labels = ([IGNORE] * len(prompt) + completion)[:max_length]
    else:
        raise ValueError(f'{where}: expected an object with a "text" string, or "prompt" and "completion" strings')
    if sum(label != IGNORE for label in labels[1:]) == 0:
        raise ValueError(
            f"{where}: nothing to learn (fewer than 2 tokens, or the completion is cut off by --max-length)"
        )
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
    torch.save(
        {
            "format": FILE_FORMAT,
            "method": model.tuning,
            "num_prompt_tokens": model.prompt_embeddings.shape[0],
            "config_hash": model.swarm.config_hash,
            "model": model.name_or_path,
            "tensors": tensors,
            **(extra or {}),
        },
        path,
    )


def load_prompts(model, path: str) -> dict:
    """Put the prompts of the file at `path` on `model` (for generation; ptune or deep_ptune). ValueError with a
    one-line reason if the file is not a prompt file or was trained for another model."""
    return apply_prompts(model, read_prompts(path), path)


def read_prompts(path: str) -> dict:
    """The prompt file at `path`, checked to be one (before any connection: a wrong file is said at once).
    ValueError with a one-line reason otherwise: never torch's paragraphs on weights_only."""
    where = f"--prompt-weights {path}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says what matters
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise ValueError(f"{where}: cannot read it ({error.strerror or error})") from None
    except Exception as error:  # what torch's unpickler raises on other files: UnpicklingError, EOFError, KeyError...
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        what = f"it holds a {found.group(1)}, not only tensors" if found else "not a file written by torch.save"
        raise ValueError(f"{where}: cannot read it: {what} (a prompt file comes from `potluck finetune --out`)") \
            from None
    if not isinstance(saved, dict) or saved.get("format") != FILE_FORMAT:
        raise ValueError(f"{where}: not a prompt file written by `potluck finetune`")
    return saved


def apply_prompts(model, saved: dict, path: str) -> dict:
    """Put the prompts `read_prompts(path)` returned on `model`; ValueError if they were trained for another model."""
    where = f"--prompt-weights {path}"
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


