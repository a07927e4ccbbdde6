"""Weight-only quantisation of a span's projection matrices: `--quant none | int8 | nf4`.

Plain torch (no networking). Only the decoder layers' `nn.Linear` weights are quantised; norms,
biases, embeddings, rotary buffers and other parameters (e.g. Mixtral's router and its experts' fused
3-D tensors) stay in the compute dtype. Activations stay in the compute dtype too: each product dequantises on the fly.

- int8: symmetric, one scale per output channel (row of W [out, in]): W ~ q * scale, |q| <= 127.
  On CPU, decode-sized products run torch's own int8 kernel (`torch._weight_int8pack_mm`, in bfloat16:
  ~2x faster than the float32 product); prefill-sized ones and other devices dequantise and multiply.
- nf4 (QLoRA's 4-bit NormalFloat code): blocks of 64 weights, each scaled by its absmax (float32)
  and rounded to the nearest of 16 code values; two codes a byte. On CUDA through bitsandbytes
  (imported lazily; not installed on our test machines, so that path is untested); elsewhere a pure
  torch version that dequantises the whole matrix for each product: saves memory, costs speed.

The quantised weights replace the float ones: the float matrices are released, so a quantised span
holds ~1/4 (int8) or ~1/7 (nf4) of the float32 weight bytes of its projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.weights.fast_linear import TransposedLinear
from node.model.lean import LEAN_MATRICES, release_projections

QUANT_MODES = ("none", "int8", "nf4")
NF4_BLOCK = 64
# The NF4 code values (Dettmers et al. 2023; bitsandbytes' table): quantiles of a unit normal, scaled to [-1, 1].
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
_CHUNK = 1 << 20  # weights quantised at a time (bounds the temporary int64/float copies)
_PRODUCT_ROWS = 1024  # rows of W dequantised at a time for an int8 product of many rows (fewer: MKL's kernels differ)


class QuantError(ValueError):
    """A quantisation mode that cannot run here (unknown, or a missing library)."""


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise QuantError(f"--quant {mode!r}: expected one of {', '.join(QUANT_MODES)}")
    return mode


def quantized_nbytes(out_features: int, in_features: int, mode: str) -> int:
    """Bytes a [out, in] projection weight takes when quantised in `mode` (not for "none")."""
    if mode == "int8":
        return out_features * in_features + out_features * 4  # int8 values + one scale per row (<= 4 bytes)
    if mode == "nf4":
        blocks = -(-out_features * in_features // NF4_BLOCK)
        return blocks * NF4_BLOCK // 2 + blocks * 4  # two codes a byte + a float32 absmax per block
    raise QuantError(f"no quantised size for mode {mode!r}")


# -- int8 -------------------------------------------------------------------------------------------
KERNEL_ROWS = 8  # CPU products of up to this many rows use torch's int8 kernel; longer ones dequantise


class Int8Weight:
    """W [out, in] as int8 rows and a scale per row; `linear(x, bias)` is x @ W.T + bias.

    On CPU, products of few rows (decoding) run `torch._weight_int8pack_mm`; it is fast only for bfloat16
    (or float16) inputs, so float32 activations are rounded to bfloat16 for it (relative error ~0.4 %,
    below the int8 weights' own ~0.7 %) and the result is returned in float32. Products of many rows
    (prefill), and every product off the CPU, dequantise W a block of rows at a time to the compute dtype and
    multiply, scaling after: nothing but the int8 rows and the scales stays resident."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        out_features, in_features = weight.shape
        self.shape, self.dtype, self.device = (out_features, in_features), dtype, weight.device
        # the kernel crashes the process (SIGSEGV, torch 2.13) unless `in` is a multiple of 16: ask for 32
        self.kernel = weight.device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm") and in_features % 32 == 0
        self.data = torch.empty((out_features, in_features), dtype=torch.int8, device=weight.device)
        scales = torch.empty(out_features, dtype=torch.float32, device=weight.device)
        rows = max(1, _CHUNK // max(in_features, 1))
        for a in range(0, out_features, rows):
            w = weight[a : a + rows].float()
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            self.data[a : a + rows] = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            scales[a : a + rows] = scale
        self.scales = scales.to(dtype)
        self._kernel_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        self._kernel_scales = scales.to(self._kernel_dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [self.data, self.scales, self._kernel_scales]

    def dequantize(self) -> torch.Tensor:
        return (self.data.float() * self.scales.float()[:, None]).to(self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel and flat.shape[0] <= KERNEL_ROWS:
            out = torch._weight_int8pack_mm(flat.to(self._kernel_dtype).contiguous(), self.data, self._kernel_scales)
            out = out.to(x.dtype)
        else:
            out = self._dequantised_product(flat)
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], self.shape[0])

    def _dequantised_product(self, flat: torch.Tensor) -> torch.Tensor:
        """flat @ W.T, W dequantised _PRODUCT_ROWS rows at a time into one buffer (a remainder joins the block before
        it), never the whole matrix in float32: 4x its int8 bytes for the length of the product (470 MB for an 8B
        model's fused gate/up; 34 MB now). The blocks split the output, not the sums: MKL computes every column as
        the whole-matrix product did (measured on one thread: the same numbers on the Llama and SmolLM2 shapes; on
        several, MKL's own partition of a product may differ in the last bit). Scaled after, as before."""
        out_features, in_features = self.shape
        out = torch.empty(flat.shape[0], out_features, dtype=flat.dtype, device=flat.device)
        buffer = torch.empty(min(out_features, 2 * _PRODUCT_ROWS - 1), in_features, dtype=flat.dtype,
                             device=flat.device)
        start = 0
        while start < out_features:
            end = out_features if out_features - start < 2 * _PRODUCT_ROWS else start + _PRODUCT_ROWS
            block = buffer[: end - start]
            block.copy_(self.data[start:end])
            out[:, start:end] = F.linear(flat, block)
            start = end
        return out.mul_(self.scales)


# -- nf4 --------------------------------------------------------------------------------------------
def _nf4_pairs(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: the two code values a packed byte stands for (high nibble first)."""
    byte = torch.arange(256)
    return torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 15]], dim=1).to(device, dtype)


class NF4Weight:
    """W [out, in] in blockwise 4-bit NormalFloat, pure torch; every product dequantises W first."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        self.shape, self.dtype, self.device = tuple(weight.shape), dtype, weight.device
        flat = weight.reshape(-1)
        numel = flat.numel()
        blocks = -(-numel // NF4_BLOCK)
        self.packed = torch.empty(blocks * NF4_BLOCK // 2, dtype=torch.uint8, device=weight.device)
        self.absmax = torch.empty(blocks, dtype=torch.float32, device=weight.device)
        mids = ((NF4_CODE[1:] + NF4_CODE[:-1]) / 2).to(weight.device)
        step = (_CHUNK // NF4_BLOCK) * NF4_BLOCK
        for a in range(0, blocks * NF4_BLOCK, step):
            part = flat[a : a + step].float()
            if part.numel() % NF4_BLOCK:
                part = F.pad(part, (0, NF4_BLOCK - part.numel() % NF4_BLOCK))
            part = part.view(-1, NF4_BLOCK)
            absmax = part.abs().amax(dim=1).clamp_min(1e-12)
            codes = torch.bucketize(part / absmax[:, None], mids).view(-1).to(torch.uint8)
            self.packed[a // 2 : (a + codes.numel()) // 2] = (codes[0::2] << 4) | codes[1::2]
            self.absmax[a // NF4_BLOCK : a // NF4_BLOCK + absmax.numel()] = absmax
        self._pairs = _nf4_pairs(dtype, weight.device)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.absmax.numel() * 4

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.absmax]

    def dequantize(self) -> torch.Tensor:
        values = torch.index_select(self._pairs, 0, self.packed.int()).view(-1, NF4_BLOCK)
        values = values * self.absmax.to(self.dtype)[:, None]
        out_features, in_features = self.shape
        return values.view(-1)[: out_features * in_features].view(out_features, in_features)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), bias)


class BnbNF4Weight:
    """W [out, in] in bitsandbytes' NF4 (CUDA). UNTESTED here: bitsandbytes is not installed on our CI."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnb_functional
        except ImportError:
            raise QuantError("--quant nf4 on CUDA needs bitsandbytes (pip install bitsandbytes)") from None
        self._bnb = bnb
        self.shape, self.dtype, self.device = tuple(weight.shape), dtype, weight.device
        self.packed, self.state = bnb_functional.quantize_4bit(weight.to(dtype).contiguous(), blocksize=NF4_BLOCK,
                                                               quant_type="nf4")

    @property
    def nbytes(self) -> int:
        return (
            self.packed.numel() * self.packed.element_size()
            + self.state.absmax.numel() * self.state.absmax.element_size()
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.state.absmax]

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(self.packed, self.state)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self._bnb.matmul_4bit(x, self.packed.t(), bias=bias, quant_state=self.state)  # as bnb.nn.Linear4bit


QuantWeight = Int8Weight | NF4Weight | BnbNF4Weight


def quantize_weight(weight: torch.Tensor, mode: str, dtype: torch.dtype) -> QuantWeight:
    """W [out, in] (any float dtype) quantised in `mode`, computing in `dtype` on W's device."""
    weight = weight.detach()
    if mode == "int8":
        return Int8Weight(weight, dtype)
    if mode == "nf4":
        return BnbNF4Weight(weight, dtype) if weight.device.type == "cuda" else NF4Weight(weight, dtype)
    raise QuantError(f"cannot quantise in mode {mode!r}")


# -- spans ------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """Drop-in for nn.Linear (or fast_linear.TransposedLinear) in inference, with a quantised weight."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None):
        super().__init__()
        self.qweight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.linear(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {type(self.qweight).__name__}"


def _is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, TransposedLinear)


def quantize_linears(module: nn.Module, mode: str, dtype: torch.dtype) -> int:
    """Replace every linear layer under `module` by a QuantLinear; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if _is_linear(child) and not child.weight.is_meta and child.weight.numel():
            setattr(module, name, QuantLinear(quantize_weight(child.weight, mode, dtype), child.bias))
            count += 1
        else:
            count += quantize_linears(child, mode, dtype)
    return count


def quantize_span(span: nn.Module, mode: str) -> int:
    """Quantise a loaded SpanModel's projections in place (after `make_lean`, if it is lean); returns how many
    matrices were quantised. The float matrices are released."""
    check_mode(mode)
    if mode == "none":
        return 0
    dtype = span.dtype
    if span.lean is None:
        return quantize_linears(span.layers, mode, dtype)
    count = 0
    for layer in span.lean.layers:
        for name in LEAN_MATRICES:
            setattr(layer, name, quantize_weight(getattr(layer, name).t(), mode, dtype))
            count += 1
    release_projections(span)  # the lean copies were the only users of the layers' projections
    return count


def weight_bytes(span: nn.Module) -> int:
    """Bytes held by the span's weights now (module tensors, lean fused copies, quantised weights), each
    storage counted once."""
    seen: dict[int, int] = {}

    def add(tensor) -> None:
        if isinstance(tensor, torch.Tensor) and not tensor.is_meta and tensor.numel():
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for module in span.modules():
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            add(tensor)
        if isinstance(module, QuantLinear):
            for tensor in module.qweight.tensors():
                add(tensor)
    lean = getattr(span, "lean", None)
    opaque = 0  # node/model/fast_linear.PackedWeight: no storage to look at, its size instead
    for layer in lean.layers if lean is not None else []:
        for value in vars(layer).values():
            for tensor in value.tensors() if hasattr(value, "tensors") else [value]:
                add(tensor)
            if hasattr(value, "tensors") and not value.tensors():
                opaque += value.nbytes
    return sum(seen.values()) + opaque


def layer_bytes(layer: nn.Module, mode: str) -> int:
    """A (meta or real, unquantised) layer's weight bytes once quantised in `mode`: what `quantize_span` keeps."""
    check_mode(mode)
    total, quantised = 0, set()
    if mode != "none":
        for module in layer.modules():
            if _is_linear(module):
                total += quantized_nbytes(module.out_features, module.in_features, mode)
                quantised.add(id(module.weight_t if hasattr(module, "weight_t") else module.weight))
    return total + sum(p.numel() * p.element_size() for p in layer.parameters() if id(p) not in quantised)
