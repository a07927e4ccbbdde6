"""A lean runtime for LLaMA-style spans: fused weights, a static KV cache, and batched decoding.

transformers' layer classes are general and pay for it on every token (cache objects, mask
builders, kwargs plumbing, one matrix product per projection). For the families whose layer is
plain pre-norm attention + gated MLP (LLaMA, Mistral, Qwen2, Qwen3) this module runs the same
arithmetic with fewer, larger operations:

- q/k/v fused into one product and gate/up into another, weights stored transposed ([in, out],
  contiguous: ~25 % faster one-row products on CPU, see fast_linear.py);
- a static KV cache per session (`StaticKV`: [layers, batch, kv_heads, length, head_dim], grown KV_CHUNK
  tokens at a time as the session grows; a rewind is just a smaller position);
- the decode steps of several sessions in one pass (`run` with many rows): every weight is read
  once for all of them, attention runs per session over its own cache, with the very call that
  session would make alone (so a row's attention never depends on the others' caches).

The results equal transformers' up to float rounding; tests/test_lean.py checks them against the
family's own `XForCausalLM`. Other families run on the generic span (`SpanModel.forward`
with transformers' DynamicCache)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from node.model.lean_decode import FusedDecode
from node.model.lora import lean_add, lean_plan

if TYPE_CHECKING:
    from node.model.span import SpanModel

SUPPORTED_LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}


KV_CHUNK = 256  # tokens a StaticKV grows by: memory follows a session's length, not its max_length


class KVMeter:
    """The bytes the StaticKV caches made with it hold now (a cache's bytes go back when it is collected)."""

    def __init__(self) -> None:
        self.bytes = 0

    def _release(self, held: list[int]) -> None:
        self.bytes -= held[0]
        held[0] = 0


class StaticKV:
    """Keys and values of one session over its layers, up to its max_length.

    The memory grows with the session, KV_CHUNK tokens at a time (a write past the allocation moves the cache
    into a larger one); `reserved_bytes` is what it holds now. A rewind keeps the allocation."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, chunk: int = KV_CHUNK, meter: KVMeter | None = None):
        self._meter, self._held = meter, [0]  # bytes counted in `meter` (a list: the finaliser reads it)
        if meter is not None:
            weakref.finalize(self, meter._release, self._held)
        self._shape = (layers, batch, kv_heads, 0, head_dim)
        self._dtype, self._device, self._chunk = dtype, device, chunk
        self.keys = torch.empty(self._shape, dtype=dtype, device=device)
        self.values = torch.empty(self._shape, dtype=dtype, device=device)
        self.max_length = max_length
        self.length = 0  # tokens written so far (per sequence)

    @property
    def capacity(self) -> int:
        """Tokens (per sequence) the allocation holds now."""
        return self.keys.shape[3]

    @property
    def reserved_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def _grow(self, tokens: int) -> None:
        """Hold at least `tokens` positions: the next multiple of the chunk, at most max_length."""
        capacity = min(self.max_length, max(tokens, -(-tokens // self._chunk) * self._chunk))
        layers, batch, heads, _, dim = self._shape
        shape = (layers, batch, heads, capacity, dim)
        keys = torch.empty(shape, dtype=self._dtype, device=self._device)
        values = torch.empty(shape, dtype=self._dtype, device=self._device)
        kept = min(self.length, self.capacity)
        if kept:
            keys[:, :, :, :kept] = self.keys[:, :, :, :kept]
            values[:, :, :, :kept] = self.values[:, :, :, :kept]
        self.keys, self.values = keys, values
        if self._meter is not None:
            self._meter.bytes += self.reserved_bytes - self._held[0]
            self._held[0] = self.reserved_bytes

    def get_seq_length(self) -> int:
        return self.length

    def write(
        self, layer: int, past: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys and values [batch, kv_heads, tokens, head_dim] of `layer` at positions [past, past + tokens);
        returns that layer's keys and values up to there (views)."""
        batch, total = keys.shape[0], past + keys.shape[2]
        if total > self.capacity:
            self._grow(total)
        self.keys[layer, :batch, :, past:total] = keys
        self.values[layer, :batch, :, past:total] = values
        return self.keys[layer, :batch, :, :total], self.values[layer, :batch, :, :total]

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (a negative count, as DynamicCache.crop takes it).

        Nothing moves: later steps overwrite the forgotten slots."""
        if tokens_to_remove >= 0:
            raise ValueError("give a negative count of tokens to remove")
        self.length = max(self.length + tokens_to_remove, 0)


LEAN_MATRICES = ("qkv_t", "o_t", "gate_up_t", "down_t")  # a LeanLayer's weight matrices, one per product
# the projections each matrix is made of, side by side (LeanSpan._lean_layer fuses them so; the layout reads
# them again so, node/runtime/layout.py)
LEAN_PROJECTIONS = {
    "qkv_t": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_t": ("self_attn.o_proj",),
    "gate_up_t": ("mlp.gate_proj", "mlp.up_proj"),
    "down_t": ("mlp.down_proj",),
}


@dataclass
class LeanLayer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv_t: torch.Tensor               # [hidden, (q_heads + 2 kv_heads) * head_dim]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None       # Qwen3: RMSNorm over each head's queries and keys
    k_norm: torch.Tensor | None
    o_t: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up_t: torch.Tensor           # [hidden, 2 * intermediate]
    gate_up_bias: torch.Tensor | None
    down_t: torch.Tensor
    down_bias: torch.Tensor | None
    eps: float
    qk_eps: float
    scaling: float
    act: nn.Module


@dataclass
class Row:
    """One session's part of a pass: its new hidden states and where they go in its cache."""

    hidden: torch.Tensor                 # [batch, tokens, hidden]
    position_ids: torch.Tensor           # [batch, tokens]
    past: int                            # tokens already in the cache
    cache: StaticKV | None               # None: a stateless pass (Forward RPC)
    mask: torch.Tensor | None = None     # [batch, past + tokens] 1 = real token, 0 = padding; None = no padding
    adapter: object = None               # node/model/lora.LoraAdapter of this row's session; None = the base model
    prompts: torch.Tensor | None = None  # deep prompts [end - start, batch, prompt_tokens, hidden] of the run's
                                         # layers, added to the first prompt_tokens positions at each layer's input


def _weight_t(linear: nn.Module) -> torch.Tensor:
    """A projection's weight as [in, out]."""
    weight_t = getattr(linear, "weight_t", None)
    return weight_t if weight_t is not None else linear.weight.t()


def _fuse(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Several projections of the same input as one [in, sum(out)] contiguous matrix (+ bias). One projection
    keeps its own [in, out] matrix when it is contiguous already (no copy)."""
    if len(linears) == 1:
        return _weight_t(linears[0]).contiguous(), getattr(linears[0], "bias", None)
    fused = torch.cat([_weight_t(linear) for linear in linears], dim=1).contiguous()
    return fused, _fused_bias(linears, fused.dtype, fused.device)


def _fused_bias(linears: list[nn.Module], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The projections' biases side by side (zeros for those without one); None if none has one."""
    biases = [getattr(linear, "bias", None) for linear in linears]
    if all(b is None for b in biases):
        return None
    if len(linears) == 1:
        return biases[0]
    return torch.cat(
        [
            b if b is not None else torch.zeros(_weight_t(lin).shape[1], dtype=dtype, device=device)
            for b, lin in zip(biases, linears)
        ]
    )


# Held(name, weights) -> a lean matrix: the projections' weights [out_i, in] as read (their stored dtype) made into
# the final form of LEAN_MATRICES' `name` (a [in, out] tensor, or an object with `linear`: node/model/compact.py)
Held = Callable[[str, list[torch.Tensor]], object]


def _release(*linears: nn.Module) -> None:
    """Drop a projection's own weight once its fused copy exists (the generic path is not used then)."""
    for linear in linears:
        for name in ("weight", "weight_t"):
            if isinstance(getattr(linear, name, None), nn.Parameter):
                setattr(linear, name, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))


def release_projections(span: nn.Module) -> None:
    """Drop every projection's own weight in the span's layers once its lean matrices were re-made (quantised,
    held exactly): they are the only ones used from then on (o/down were shared with their modules, not copied)."""
    _release(
        *(module for module in span.layers.modules() if isinstance(module, nn.Linear) or hasattr(module, "weight_t"))
    )


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm recipe: normalise in float32, scale in the input dtype.

    In float32 that is torch's fused rms_norm, equal up to float rounding (one kernel instead of six:
    ~15 us less per call on a 576-wide row)."""
    dtype = x.dtype
    if dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == swap_halves(x) * signed_sin."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding, x * cos + rotate_half(x) * sin, in three kernels instead of six."""
    shape = x.shape
    swapped = x.reshape(*shape[:-1], 2, shape[-1] // 2).flip(-2).reshape(shape)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(weight_t, torch.Tensor):  # quantised (node/model/quant.py): it runs its own product
        return weight_t.linear(x, bias)
    return torch.addmm(bias, x, weight_t) if bias is not None else x @ weight_t


def lean_unsupported(span: SpanModel) -> str | None:
    """Why this span cannot run on the lean path, or None if it can."""
    names = {type(layer).__name__ for layer in span.layers}
    if not names <= SUPPORTED_LAYERS:
        return f"layer classes {sorted(names - SUPPORTED_LAYERS)} have no lean path"
    if span.rotary_emb is None:
        return "no rotary embedding"
    for layer in span.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention without q/k/v/o projections"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "MLP without gate/up/down projections"
    return None


class LeanSpan:
    """The same layers as a SpanModel, run with fused weights and static caches."""

    def __init__(self, span: SpanModel, held: Held | None = None, build: bool = True,
                 device: torch.device | None = None):
        """`held`: how each matrix is made from its projections' weights (None: fused as they are, in the layers'
        dtype); `build`: make every layer now (else `add_layer` makes them one by one, as a loader reads them, on
        `device`: the span's layers are still on the meta device then)."""
        reason = lean_unsupported(span)
        if reason:
            raise ValueError(reason)
        config = span.config
        self.start, self.end = span.start, span.end
        self.dtype, self.device = span.dtype, device or span.device
        first = span.layers[0].self_attn
        self.head_dim = first.head_dim
        self.q_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.q_heads
        self.window = self._window(span)
        self.layer_types = span.layer_types
        self.rotary = span.rotary_emb
        self.kv = KVMeter()  # bytes its sessions' caches hold now
        self._held = held
        self.fused = FusedDecode.of(self)  # decode.c's passes, where the layers and rows allow (None: never here)
        self.layers: list[LeanLayer] = []
        for layer in span.layers if build else ():
            self.add_layer(layer)

    def add_layer(self, layer: nn.Module) -> LeanLayer:
        """Make the next layer's lean form from its (loaded) module, and drop the module's projection weights."""
        self.layers.append(self._lean_layer(layer))
        return self.layers[-1]

    @staticmethod
    def _window(span: SpanModel) -> int | None:
        """The smallest sliding window among the span's layers (None: all attend to everything)."""
        if "sliding_attention" not in span.layer_types:
            return None
        return int(span.config.sliding_window)

    def _lean_layer(self, layer: nn.Module) -> LeanLayer:
        attention, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
        fused = {}
        for name, projections in LEAN_PROJECTIONS.items():
            linears = [layer.get_submodule(p) for p in projections]
            if self._held is None:
                fused[name] = _fuse(linears)
            else:
                fused[name] = (self._held(name, [linear.weight for linear in linears]),
                               _fused_bias(linears, self.dtype, self.device))
        lean = LeanLayer(
            input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
            qkv_t=fused["qkv_t"][0], qkv_bias=fused["qkv_t"][1],
            q_norm=q_norm.weight if q_norm is not None else None, k_norm=k_norm.weight if k_norm is not None else None,
            o_t=fused["o_t"][0], o_bias=fused["o_t"][1],
            gate_up_t=fused["gate_up_t"][0], gate_up_bias=fused["gate_up_t"][1],
            down_t=fused["down_t"][0], down_bias=fused["down_t"][1],
            eps=layer.input_layernorm.variance_epsilon,
            qk_eps=q_norm.variance_epsilon if q_norm is not None else 0.0,
            scaling=attention.scaling, act=mlp.act_fn,
        )
        _release(attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj)
        if self._held is not None:  # o and down were made anew too
            _release(attention.o_proj, mlp.down_proj)
        return lean

    def new_cache(self, start: int, end: int, batch: int, max_length: int) -> StaticKV:
        return StaticKV(end - start, batch, self.kv_heads, max_length, self.head_dim, self.dtype, self.device,
                        meter=self.kv)

    def run(self, rows: list[Row], start: int, end: int) -> list[torch.Tensor]:
        """Layers [start, end) over every row in one pass; returns each row's output hidden states.

        Rows with a cache write their keys/values at [past, past + tokens) of layers relative to
        `start` (every row's cache covers exactly [start, end)); the cache then holds past + tokens.
        Decode steps run in one C call where the span allows (node/model/lean_decode.py), the other rows on
        torch: a row takes the same path alone and in any pass, so its bits do not depend on the others."""
        fused = self.fused.takes(rows) if self.fused is not None else [False] * len(rows)
        if all(fused):
            return self.fused.run(rows, start, end)
        if not any(fused):
            return self._run(rows, start, end)
        outputs = dict(zip((i for i, f in enumerate(fused) if f),
                           self.fused.run([row for row, f in zip(rows, fused) if f], start, end)))
        outputs.update(zip((i for i, f in enumerate(fused) if not f),
                           self._run([row for row, f in zip(rows, fused) if not f], start, end)))
        return [outputs[i] for i in range(len(rows))]

    def _run(self, rows: list[Row], start: int, end: int) -> list[torch.Tensor]:
        """`run` on torch's operations."""
        hidden = self.q_heads * self.head_dim
        sizes = [row.hidden.shape[0] * row.hidden.shape[1] for row in rows]
        x = torch.cat([row.hidden.reshape(-1, row.hidden.shape[-1]) for row in rows]).to(self.device, self.dtype)
        cos, sin = self._rotary(x, rows)
        kinds = set(self.layer_types[start - self.start : end - self.start])
        masks = {kind: [self._attention_mask(row, self.window if kind == "sliding_attention" else None) for row in rows]
                 for kind in kinds}
        q_size, kv_size = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        lora = lean_plan(rows, sizes, self.device)  # LoRA: rows grouped by adapter ([] if none has one)
        prompted, offset = [], 0
        for row, size in zip(rows, sizes):
            if row.prompts is not None:
                prompted.append((row, slice(offset, offset + size)))
            offset += size
        for index in range(start, end):
            layer = self.layers[index - self.start]
            if prompted:  # deep prompts, as SpanModel.forward_prompted adds them (x is this pass's own tensor)
                for row, part in prompted:
                    count = row.prompts.shape[2]
                    x[part].view(row.hidden.shape)[:, :count] += row.prompts[index - start]
            h = _rms(x, layer.input_norm, layer.eps)
            qkv = _linear(h, layer.qkv_t, layer.qkv_bias)
            if lora:
                lean_add(lora, qkv, h, index, "qkv")
            v = qkv[:, q_size + kv_size :].view(-1, self.kv_heads, self.head_dim)
            if layer.q_norm is None:  # queries and keys side by side: one rotation for both
                qk = _rotate(qkv[:, : q_size + kv_size].view(-1, self.q_heads + self.kv_heads, self.head_dim),
                             cos, sin)
                q, k = qk[:, : self.q_heads], qk[:, self.q_heads :]
            else:
                q = _rms(qkv[:, :q_size].view(-1, self.q_heads, self.head_dim), layer.q_norm, layer.qk_eps)
                k = _rms(qkv[:, q_size : q_size + kv_size].view(-1, self.kv_heads, self.head_dim), layer.k_norm,
                         layer.qk_eps)
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            layer_masks = masks[self.layer_types[index - self.start]]
            if len(rows) == 1:
                attended = self._attend(rows[0], index - start, q, k, v, layer_masks[0], layer.scaling)
            else:
                attended = torch.empty(x.shape[0], hidden, dtype=x.dtype, device=x.device)
                offset = 0
                for row, size, mask in zip(rows, sizes, layer_masks):
                    part = slice(offset, offset + size)
                    attended[part] = self._attend(row, index - start, q[part], k[part], v[part], mask, layer.scaling)
                    offset += size
            o = _linear(attended, layer.o_t, layer.o_bias)
            if lora:
                lean_add(lora, o, attended, index, "o")
            x = x + o
            h = _rms(x, layer.post_norm, layer.eps)
            gate_up = _linear(h, layer.gate_up_t, layer.gate_up_bias)
            if lora:
                lean_add(lora, gate_up, h, index, "gate_up")
            gate, up = gate_up.chunk(2, dim=-1)
            mid = layer.act(gate) * up
            down = _linear(mid, layer.down_t, layer.down_bias)
            if lora:
                lean_add(lora, down, mid, index, "down")
            x = x + down
        outputs, offset = [], 0
        for row, size in zip(rows, sizes):
            outputs.append(x[offset : offset + size].view(row.hidden.shape))
            offset += size
            if row.cache is not None:
                row.cache.length = row.past + row.hidden.shape[1]
        return outputs

    def _rotary(self, x: torch.Tensor, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see _rotate) for every token of every row: [tokens, 1, head_dim]."""
        positions = torch.cat([row.position_ids.reshape(-1) for row in rows]).to(self.device)
        cos, sin = self.rotary(x[None], positions[None])
        return cos[0, :, None, :], _signed_sin(sin[0, :, None, :])

    def _attention_mask(self, row: Row, window: int | None) -> torch.Tensor | None:
        """The additive mask of a row over its cache ([batch, 1, tokens, past + tokens]), or None if
        plain causal attention is exact (no padding, no window cut; one token, or a fresh cache).

        A sliding window lets query q see key k when q - window < k <= q, as transformers' does."""
        batch, tokens = row.hidden.shape[:2]
        total = row.past + tokens
        windowed = window is not None and total > window
        if row.mask is None and not windowed and (tokens == 1 or row.past == 0):
            return None
        query = torch.arange(row.past, total, device=self.device)[:, None]
        key = torch.arange(total, device=self.device)[None, :]
        allowed = key <= query  # [tokens, total]
        if windowed:
            allowed = allowed & (key > query - window)
        allowed = allowed[None, None].expand(batch, 1, tokens, total)
        if row.mask is not None:
            allowed = allowed & row.mask.to(self.device, torch.bool)[:, None, None, :total]
        # a finite minimum, not -inf: a padding query that sees nothing still gets finite (unused) values
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)

    def _attend(self, row: Row, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        batch, tokens = row.hidden.shape[:2]
        d, groups = self.head_dim, self.q_heads // self.kv_heads
        k = k.view(batch, tokens, self.kv_heads, d).transpose(1, 2)
        v = v.view(batch, tokens, self.kv_heads, d).transpose(1, 2)
        if row.cache is not None:
            k, v = row.cache.write(layer, row.past, k, v)
        if tokens == 1:
            # one query per head: fold the heads sharing a kv head into its query rows (no repeat of k/v)
            q = q.view(batch, self.kv_heads, groups, d)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
            return out.reshape(batch, self.q_heads * d)
        q = q.view(batch, tokens, self.q_heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                             enable_gqa=groups > 1)
        return out.transpose(1, 2).reshape(batch * tokens, self.q_heads * d)

