"""PEFT LoRA adapters on a span, applied per row without touching the base weights.

A node loads only its span's part of an adapter (`load_adapter`): the A/B matrices of the
targeted projections in layers `[start, end)` (global indices in the tensor names, as PEFT saves
them). A projection then computes

    y = base(x) + scale * (x @ A^T) @ B^T,     scale = lora_alpha / r  (or / sqrt(r) with use_rslora)

with the scale folded into B once at load time. Nothing is merged into the base weights, so any
number of adapters and the plain base model share one node and one batched pass:

- lean path (node/model/lean.py): `lean_plan` groups a pass's rows by adapter, and `lean_add`
  adds each group's delta to the right columns of the fused q/k/v and gate/up products;
- generic path (transformers' layers, e.g. MoE families): `LoraAdapter.hooked(span)` puts forward
  hooks on the targeted linear modules for the duration of one forward (one session per pass there).

Supported: LoRA on linear projections (q/k/v/o/gate/up/down; on the generic path any linear module
of a decoder layer), per-module ranks (rank_pattern), use_rslora, bias "none". Refused with a
ModelLoadError that says why: DoRA, LoRA biases, embedding targets, alpha_pattern, modules_to_save
that replace weights of the node's layers, non-linear targets (fused MoE experts), shapes that do
not fit the model. Plain torch: no networking here."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.weights.errors import ModelLoadError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # adapter names: what records and metadata carry
MAX_ADAPTERS = 16  # per node: their names go into its peer record (which takes at most 32, in 4 KB)

# The lean runtime's fused products and the projections they hold, in column order.
LEAN_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
LEAN_PATHS = frozenset(path for paths in LEAN_GROUPS.values() for path in paths)

_LORA_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+?)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")
# adapter_config.json options that change the arithmetic in ways this module does not implement
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)", "fan_in_fan_out": "fan_in_fan_out (Conv1D)",
    "alpha_pattern": "per-module alphas (alpha_pattern)", "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters, e.g. MoE experts)",
    "trainable_token_indices": "trainable tokens (embedding rows)",
}


def check_name(name: str) -> str:
    """An adapter name as nodes advertise it: 1-64 of letters, digits, '.', '_', '-'."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not starting with "
                         f"'.', '_' or '-')")
    return name


@dataclass
class LoraPair:
    """One projection's low-rank update: delta(x) = (x @ a_t) @ b_t, the scale folded into b_t."""

    a_t: torch.Tensor  # [in, r]
    b_t: torch.Tensor  # [r, out], times scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a_t) @ self.b_t


@dataclass
class FusedLora:
    """The updates of one lean product (several projections of one input): one A for all of them."""

    a_t: torch.Tensor  # [in, sum of ranks]
    parts: list[tuple[int, int, int, int, torch.Tensor]]  # (column offset, width, rank from, rank to, b_t)


@dataclass
class LoraAdapter:
    """One adapter's part for a span: its updates by (global layer, module path)."""

    name: str
    source: str
    rank: int
    alpha: float
    rslora: bool
    base_model: str
    pairs: dict[tuple[int, str], LoraPair] = field(default_factory=dict)
    fused: dict[tuple[int, str], FusedLora] = field(default_factory=dict)  # (layer, LEAN_GROUPS key), lean spans

    @property
    def nbytes(self) -> int:
        return sum(p.a_t.nbytes + p.b_t.nbytes for p in self.pairs.values())

    @contextlib.contextmanager
    def hooked(self, span: nn.Module):
        """The generic path: forward hooks adding the updates to the span's targeted modules, for one forward."""
        handles = []
        try:
            for (layer, path), pair in self.pairs.items():
                module = span.layers[layer - span.start].get_submodule(path)
                handles.append(module.register_forward_hook(_hook(pair)))
            yield
        finally:
            for handle in handles:
                handle.remove()


def _hook(pair: LoraPair):
    def add(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + pair.delta(inputs[0])

    return add


# -- loading ---------------------------------------------------------------------------------------
def parse_adapter_spec(text: str) -> tuple[str, str]:
    """'NAME=PATH' (`potluck join --adapter`) -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--adapter {text!r}: expected NAME=PATH (a PEFT adapter folder or hub id)")
    return check_name(name.strip()), path.strip()


def adapter_files(source: str) -> Path:
    """The local folder of an adapter: `source` itself, or a hub id's two files (fetched, cached)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelLoadError(f"adapter {source!r} is neither a folder nor a hub id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    except Exception as error:  # network, auth, missing repo
        raise ModelLoadError(f"cannot fetch adapter {source!r} from the hub: {error}") from error


def _read_config(folder: Path, what: str) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except OSError:
        raise ModelLoadError(
            f"{what}: no {CONFIG_FILE} in {folder} (save the adapter with peft's save_pretrained)"
        ) from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{what}: {CONFIG_FILE} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{what}: {CONFIG_FILE} is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise ModelLoadError(f"{what}: peft_type {kind!r} is not supported (only LORA)")
    unsupported = [label for key, label in _UNSUPPORTED.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r}")
    if unsupported:
        raise ModelLoadError(f"{what}: not supported: {', '.join(unsupported)}")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ModelLoadError(f"{what}: {key} = {value!r} is not a positive number")
    return config


def load_adapter(name: str, source: str, span: nn.Module, model_id: str = "") -> LoraAdapter:
    """`source`'s LoRA updates for the layers of `span` (a SpanModel), checked against its modules.

    Reads only the span's tensors. Raises ModelLoadError naming what does not fit."""
    from safetensors import safe_open

    what = f"adapter {name!r} ({source})"
    folder = adapter_files(source)
    config = _read_config(folder, what)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        other = (
            " (only safetensors: re-save it with peft's save_pretrained)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise ModelLoadError(f"{what}: no {WEIGHTS_FILE} in {folder}{other}")
    rslora = bool(config.get("use_rslora", False))
    adapter = LoraAdapter(name=name, source=source, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                          rslora=rslora, base_model=str(config.get("base_model_name_or_path") or ""))
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    outside: set[str] = set()
    with safe_open(weights, framework="pt") as handle:
        for key in handle.keys():
            if "lora_embedding" in key:
                raise ModelLoadError(f"{what}: LoRA on embeddings ({key}) is not supported")
            if "lora_magnitude_vector" in key:
                raise ModelLoadError(f"{what}: DoRA ({key}) is not supported")
            layer_key = _LAYER_KEY.match(key)
            if layer_key is None:
                outside.add(key)  # head, embeddings, final norm: the client's parts
                continue
            layer = int(layer_key.group(1))
            if not span.start <= layer < span.end:
                continue
            lora_key = _LORA_KEY.match(key)
            if lora_key is None:
                raise ModelLoadError(f"{what}: {key} replaces a weight of layer {layer} (modules_to_save, LoRA bias "
                                     f"or another method): only LoRA A/B matrices are supported")
            found.setdefault((layer, lora_key.group(2)), {})[lora_key.group(3)] = handle.get_tensor(key)
    if outside:
        log.warning("%s also holds %d tensors outside the decoder layers (%s ...): the client's parts (embeddings, "
                    "head) are not adapted", what, len(outside), sorted(outside)[0])
    for (layer, path), ab in sorted(found.items()):
        adapter.pairs[(layer, path)] = _pair(what, span, layer, path, ab, config, rslora)
    if span.lean is not None:
        adapter.fused = _fuse(span, adapter.pairs)
    if adapter.base_model and model_id and Path(adapter.base_model).name != Path(model_id).name:
        log.info("%s names base model %r; this node serves %r (the shapes fit)", what, adapter.base_model, model_id)
    if not adapter.pairs:
        log.info("%s has no updates for layers %d:%d", what, span.start, span.end)
    return adapter


def _pair(what: str, span: nn.Module, layer: int, path: str, ab: dict[str, torch.Tensor], config: dict,
          rslora: bool) -> LoraPair:
    where = f"{what}: layers.{layer}.{path}"
    if set(ab) != {"A", "B"}:
        raise ModelLoadError(f"{where} has lora_{next(iter(ab))} but not its other matrix")
    if span.lean is not None and path not in LEAN_PATHS:
        raise ModelLoadError(f"{where}: the lean runtime adapts only {', '.join(sorted(LEAN_PATHS))} "
                             f"(run the node with --no-lean for other modules)")
    try:
        module = span.layers[layer - span.start].get_submodule(path)
    except AttributeError:
        raise ModelLoadError(
            f"{where}: this model's layers have no such module (an adapter for another model?)"
        ) from None
    if not isinstance(getattr(module, "in_features", None), int) or not isinstance(
        getattr(module, "out_features", None), int
    ):
        raise ModelLoadError(f"{where} is a {type(module).__name__}, not a linear projection: not supported")
    a, b = ab["A"], ab["B"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ModelLoadError(f"{where}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not pair up")
    if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
        raise ModelLoadError(f"{where}: update {module.in_features}->{module.out_features} expected, the adapter has "
                             f"{a.shape[1]}->{b.shape[0]} (an adapter for another base model?)")
    rank = a.shape[0]  # per module: rank_pattern may differ from r
    scale = float(config["lora_alpha"]) / (math.sqrt(rank) if rslora else rank)
    dtype, device = span.dtype, span.device
    return LoraPair(a_t=a.float().t().contiguous().to(device, dtype),
                    b_t=(b.float() * scale).t().contiguous().to(device, dtype))


def _fuse(span: nn.Module, pairs: dict[tuple[int, str], LoraPair]) -> dict[tuple[int, str], FusedLora]:
    """The updates grouped as the lean runtime fuses its products, with each projection's output columns."""
    fused = {}
    for layer in sorted({layer for layer, _ in pairs}):
        module = span.layers[layer - span.start]
        for group, paths in LEAN_GROUPS.items():
            a_parts, parts, offset, rank = [], [], 0, 0
            for path in paths:
                width = module.get_submodule(path).out_features
                pair = pairs.get((layer, path))
                if pair is not None:
                    r = pair.a_t.shape[1]
                    a_parts.append(pair.a_t)
                    parts.append((offset, width, rank, rank + r, pair.b_t))
                    rank += r
                offset += width
            if parts:
                fused[(layer, group)] = FusedLora(torch.cat(a_parts, dim=1).contiguous(), parts)
    return fused


def load_adapters(specs: tuple[tuple[str, str], ...], span: nn.Module, model_id: str = "") -> dict[str, LoraAdapter]:
    """Every (name, source) of a node's --adapter flags, loaded for `span`; ModelLoadError at the first that fails."""
    adapters = {}
    for name, source in specs:
        adapter = load_adapter(name, source, span, model_id)
        log.info("adapter %r: %d projections of layers %d:%d, r=%d, %.1f MB", name, len(adapter.pairs), span.start,
                 span.end, adapter.rank, adapter.nbytes / 1e6)
        adapters[name] = adapter
    return adapters


# -- the lean path: rows of one pass, grouped by adapter --------------------------------------------
def lean_plan(rows: list, sizes: list[int], device: torch.device) -> list[tuple[LoraAdapter, torch.Tensor | None]]:
    """Each adapter used in a pass with the token rows it applies to (None: all of them); [] if none is used."""
    groups: dict[int, tuple[LoraAdapter, list[int]]] = {}
    offset = 0
    for row, size in zip(rows, sizes):
        adapter = getattr(row, "adapter", None)
        if adapter is not None:
            groups.setdefault(id(adapter), (adapter, []))[1].extend(range(offset, offset + size))
        offset += size
    return [(adapter, None if len(index) == offset else torch.tensor(index, device=device))
            for adapter, index in groups.values()]


def lean_add(plan: list[tuple[LoraAdapter, torch.Tensor | None]], out: torch.Tensor, x: torch.Tensor, layer: int,
             group: str) -> None:
    """Add the updates of fused product `group` (a LEAN_GROUPS key) of `layer` to `out` = product(x), in place."""
    for adapter, index in plan:
        fused = adapter.fused.get((layer, group))
        if fused is None:
            continue
        rows = x if index is None else x.index_select(0, index)
        low = rows @ fused.a_t
        for offset, width, r0, r1, b_t in fused.parts:
            delta = low[:, r0:r1] @ b_t
            columns = out[:, offset : offset + width]
            if index is None:
                columns += delta
            else:
                columns.index_add_(0, index, delta)
