"""A span's matrices in compact forms: exact narrow weights (common/weights/exact.py) or MKL-packed ones
(common/weights/fast_linear.py), chosen per matrix at load; and what a span holds in them now."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.weights.exact import (
    BLOCK,
    PROBE_ROWS,
    ExactLinear,
    ExactParts,
    ExactWeight,
    Kernels,
    calibrate_threads,
    shared_kernels,
)
from common.weights.fast_linear import PackedWeight, TransposedLinear, mkl_packing_available
from node.model.lean import LEAN_MATRICES, release_projections
from node.model.quant import quantize_weight


def _split_sizes(lean, name: str, out_features: int) -> list[int]:
    """The output sizes of the projections fused into lean matrix `name` (LEAN_PROJECTIONS' order)."""
    if name == "qkv_t":
        return [lean.q_heads * lean.head_dim, lean.kv_heads * lean.head_dim, lean.kv_heads * lean.head_dim]
    if name == "gate_up_t":
        return [out_features // 2, out_features // 2]
    return [out_features]


def _exact_or_parts(sizes: list[int], weight_t: torch.Tensor, kernels: Kernels) -> "ExactWeight | ExactParts | None":
    """The whole fused matrix in one exact form; else its projections (of `sizes` outputs) each in theirs; None if
    no part fits one."""
    whole = ExactWeight.of(weight_t.t(), kernels)
    if whole is not None or len(sizes) == 1:
        return whole
    parts, start = [], 0
    for size in sizes:
        dense = weight_t[:, start: start + size]
        parts.append(ExactWeight.of(dense.t(), kernels) or dense.contiguous())
        start += size
    return ExactParts(parts) if any(isinstance(part, ExactWeight) for part in parts) else None


# -- spans ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExactReport:
    """What `exact_span` did: matrices kept narrow by format, matrices left dense, bytes before and after."""

    formats: dict[str, int]
    dense: int
    bytes_before: int
    bytes_after: int
    row_threads: int = 1  # threads one-row products run on (`calibrate_threads`)
    fast: int = 0         # of those held narrow, how many multiply in llama.cpp's numerics (`--numerics fast`)

    def describe(self) -> str:
        kept = ", ".join(f"{count} {fmt}" for fmt, count in sorted(self.formats.items())) or "none"
        fast = f"; {self.fast} in fast numerics (not bit-exact)" if self.fast else ""
        return (f"exact compact weights: {kept}; {self.dense} dense; "
                f"{self.bytes_before / 1e6:.1f} -> {self.bytes_after / 1e6:.1f} MB{fast}; "
                f"one-row products on {self.row_threads} thread(s)")


class _Tally:
    """The matrices `exact_span` looked at: held narrow by form (parts of split ones counted), left dense, bytes."""

    def __init__(self) -> None:
        self.formats: dict[str, int] = {}
        self.dense = self.before = self.after = 0

    def add(self, size: int, held: "ExactWeight | ExactParts | None") -> None:
        self.before += size
        if held is None:
            self.dense += 1
            self.after += size
            return
        for part in held.exact() if isinstance(held, ExactParts) else [held]:
            self.formats[part.format] = self.formats.get(part.format, 0) + 1
        self.after += held.nbytes


def _exact_linears(module: torch.nn.Module, kernels: Kernels, tally: _Tally) -> None:
    """Replace every float32 CPU linear layer under `module` held exactly by a narrow form with an ExactLinear."""


    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear or isinstance(child, TransposedLinear):
            weight = child.weight
            if weight.is_meta or not weight.numel():
                continue
            exact = ExactWeight.of(weight, kernels)
            tally.add(weight.numel() * weight.element_size(), exact)
            if exact is not None:
                setattr(module, name, ExactLinear(exact, child.bias))
        else:
            _exact_linears(child, kernels, tally)


def exact_span(span, kernels: Kernels | None = None, numerics: str = "exact") -> ExactReport | None:
    """Keep each float32 matrix of a CPU span (the lean runtime's, after `make_lean`, or transformers' own layers')
    in the narrowest exact form found, multiplying in `numerics` (`use_numerics`); None where that cannot apply
    (another dtype or device, no kernels)."""


    lean = span.lean
    if span.dtype != torch.float32 or span.device.type != "cpu":
        return None
    kernels = kernels or shared_kernels()
    if kernels is None:
        return None
    tally = _Tally()
    if lean is None:
        _exact_linears(span.layers, kernels, tally)
    for layer in lean.layers if lean is not None else ():
        for name in LEAN_MATRICES:
            weight_t = getattr(layer, name)
            if not isinstance(weight_t, torch.Tensor):
                continue  # quantised or packed already
            exact = _exact_or_parts(_split_sizes(lean, name, weight_t.shape[1]), weight_t, kernels)
            tally.add(weight_t.numel() * weight_t.element_size(), exact)
            if exact is not None:
                setattr(layer, name, exact)
    if lean is not None:
        release_projections(span)
    fast = use_numerics(span, numerics)
    return ExactReport(tally.formats, tally.dense, tally.before, tally.after, calibrate_threads(_exact_weights(span)),
                       fast)


def use_numerics(span, numerics: str) -> int:
    """Every exact weight of `span` multiplies in `numerics` from now on ("exact", or "fast": llama.cpp's numerics
    for its q4 and q8 forms, common/weights/kernels/fast.c); returns how many multiply in the fast numerics."""
    weights = _exact_weights(span)
    return sum(weight.use_numerics(numerics) and weight.fast for weight in weights)


def span_numerics(span) -> str:
    """"fast" where any of a span's products run in llama.cpp's numerics, else "exact" (what a node advertises)."""
    return "fast" if any(weight.fast for weight in _exact_weights(span)) else "exact"


class HeldForms:
    """Makes each lean matrix straight into its final form from its projections' weights as read (node/model/lean.py
    `Held`), one matrix at a time: quantised (`quant`), exact compact (`kernels`: float32 CPU spans), or dense
    [in, out] in `dtype`. The forms and values are those `quantize_span` / `exact_span` make of a float32 span;
    a bfloat16 matrix becomes its bf16 exact form from its own bytes, never widened to float32 first."""

    def __init__(self, dtype: torch.dtype, quant: str = "none", kernels: Kernels | None = None,
                 numerics: str = "exact"):
        self.dtype, self.quant, self.kernels = dtype, quant, kernels if dtype == torch.float32 else None
        self.numerics = numerics  # what the exact weights multiply in (`use_numerics`), set before they are timed
        self.tally = _Tally()

    def __call__(self, name: str, weights: list[torch.Tensor]):
        """The lean matrix `name` of these projection weights ([out_i, in] each, as stored)."""
        return self.make(weights[0] if len(weights) == 1 else torch.cat(weights), [w.shape[0] for w in weights])

    def make(self, fused: torch.Tensor, sizes: list[int]):
        """The final form of `fused` [sum(sizes), in] (projections side by side as rows, as stored, in memory of its
        own: a bf16 exact form keeps this very memory)."""
        if self.quant != "none":
            return quantize_weight(fused, self.quant, self.dtype)
        if self.kernels is None or fused.device.type != "cpu":
            return self._dense(fused)
        held = self._bf16(fused)
        if held is None and fused.dim() == 2:
            held = _exact_in_rows(fused.float().contiguous(), self.kernels)
        if held is None:
            weight_t = self._dense(fused)
            held = _exact_or_parts(sizes, weight_t, self.kernels)
            held = held if held is not None else weight_t
        self.tally.add(fused.numel() * 4, held if not isinstance(held, torch.Tensor) else None)
        return held

    def _dense(self, fused: torch.Tensor) -> torch.Tensor:
        """[in, out] in the compute dtype, contiguous."""
        out = fused.to(self.dtype).t().contiguous()
        return out.clone() if out.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() else out

    def _bf16(self, fused: torch.Tensor) -> ExactWeight | None:
        """A bfloat16 matrix as the bf16 exact form, in its own memory (what `ExactWeight.of` keeps of its float32
        values unless a narrower form holds them: that is checked on its first rows, as `of` does); None where
        that does not apply."""
        if fused.dtype != torch.bfloat16 or fused.dim() != 2 or fused.shape[1] % BLOCK or not fused.is_contiguous():
            return None
        if ExactWeight.of(fused[:PROBE_ROWS].float(), self.kernels, formats=("q4", "q8")) is not None:
            return None  # a narrower form may hold it: the float32 path decides
        return ExactWeight("bf16", (fused.shape[0], fused.shape[1]), fused.view(torch.int16), None, None,
                           self.kernels)

    def report(self, span) -> ExactReport | None:
        """What was held exactly (threads calibrated on the span's exact weights); None without kernels."""
        if self.kernels is None:
            return None
        tally = self.tally
        fast = use_numerics(span, self.numerics)
        return ExactReport(tally.formats, tally.dense, tally.before, tally.after,
                           calibrate_threads(_exact_weights(span)), fast)


ROWS_AT_ONCE = 256  # rows of a matrix encoded at a time: bounds the encoder's temporaries to a few such row blocks


def _exact_in_rows(weight: torch.Tensor, kernels: Kernels) -> ExactWeight | None:
    """`ExactWeight.of(weight)`, encoded ROWS_AT_ONCE rows at a time (each row's blocks are encoded on their own,
    so the result is the same: the first block of rows picks the narrowest form holding it, every other block must
    be held in it too); None where that form does not hold every block (the whole-matrix path decides then)."""
    out_features = weight.shape[0]
    first = ExactWeight.of(weight[:ROWS_AT_ONCE], kernels)
    if first is None or out_features <= ROWS_AT_ONCE:
        return first
    pieces = [first]
    for start in range(ROWS_AT_ONCE, out_features, ROWS_AT_ONCE):
        piece = ExactWeight.of(weight[start : start + ROWS_AT_ONCE], kernels, formats=(first.format,))
        if piece is None:
            return None
        pieces.append(piece)

    def joined(name: str) -> torch.Tensor | None:
        parts = [getattr(piece, name) for piece in pieces]
        return None if parts[0] is None else torch.cat(parts)

    return ExactWeight(first.format, (out_features, weight.shape[1]), joined("codes"), joined("steps"),
                       joined("mins"), kernels)


def exact_layer(layer: torch.nn.Module, kernels: Kernels, tally: _Tally) -> None:
    """`exact_span` for one of transformers' layers (families without a lean runtime), as a loader reads it."""
    _exact_linears(layer, kernels, tally)


def _exact_weights(span) -> list[ExactWeight]:
    """Every exact weight of a span: its lean matrices (the parts of split ones included), or its ExactLinears."""


    lean = getattr(span, "lean", None)
    if lean is None:
        return [module.exact for module in span.modules() if isinstance(module, ExactLinear)] \
            if isinstance(span, torch.nn.Module) else []
    weights = [getattr(layer, name) for layer in lean.layers for name in LEAN_MATRICES]
    return [part for weight in weights if isinstance(weight, (ExactWeight, ExactParts))
            for part in (weight.exact() if isinstance(weight, ExactParts) else [weight])]


def span_kernels(span) -> Kernels | None:
    """The kernels of a span's exact weights; None if it holds none (look once: a span's forms are set at load)."""
    weights = _exact_weights(span)
    return weights[0].kernels if weights else None


def exact_formats(span) -> dict[str, int]:
    """How many of a span's matrices (or parts of fused ones) are held in each exact form now ({} for none)."""
    counts: dict[str, int] = {}
    for weight in _exact_weights(span):
        counts[weight.format] = counts.get(weight.format, 0) + 1
    return counts


def packable(lean) -> bool:
    """Whether MKL packing applies to this LeanSpan: MKL here, and every matrix a float32 CPU one (or packed)."""
    return mkl_packing_available() and all(
        isinstance(w, PackedWeight)
        or (isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.device.type == "cpu")
        for layer in lean.layers
        for w in (getattr(layer, name) for name in LEAN_MATRICES)
    )


def pack_lean(lean) -> int:
    """Pack every matrix of a packable LeanSpan now; returns how many (0 where MKL's packing is missing)."""
    if not packable(lean):
        return 0
    count = 0
    for layer in lean.layers:
        for name in LEAN_MATRICES:
            if isinstance(getattr(layer, name), torch.Tensor):
                setattr(layer, name, PackedWeight(getattr(layer, name)))
                count += 1
    return count
