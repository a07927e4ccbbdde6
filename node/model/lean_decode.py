"""A lean span's decode pass in one C call (common/weights/kernels/decode.c), where the span and the rows allow.

A one-token row spends more of a layer in torch's dispatch than in arithmetic: ~25 small operations around
the four products, ~0.26 ms a layer on this project's 2-core machine against ~0.46 ms for the products of a
SmolLM2 layer. decode.c runs the whole layer (norms, rotary embedding, cache writes, attention, gating) around
the same product kernels.

It takes a pass when:
- the span: float32 on the CPU, every layer plain (no q/k norms, no biases, silu gating), and each of its four
  matrices one exact compact weight (common/weights/exact.py; the fast numerics follow each weight's setting);
- the rows: decode steps (one token each), each with its cache, no padding mask, no adapter, no deep prompts,
  no sliding window cut.
Anything else runs on torch as before (`LeanSpan.run`)."""

from __future__ import annotations

import ctypes
import logging
import time

import torch
from torch import nn
from transformers.activations import SiLUActivation

from common.weights.exact import ExactWeight
from common.weights.threads import PassThreads, saved_threads

log = logging.getLogger(__name__)

_p, _i, _f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
FORMS = {"q4": 0, "q8": 1, "bf16": 2}
MATRICES = ("qkv_t", "o_t", "gate_up_t", "down_t")  # lean.py's LEAN_MATRICES (lean.py imports this module)
SILU = (nn.SiLU, SiLUActivation)  # torch's and transformers' (both F.silu)


class _Matrix(ctypes.Structure):
    _fields_ = [("form", _i), ("fast", _i), ("N", _i), ("K", _i), ("codes", _p), ("steps", _p), ("mins", _p)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_norm", _p), ("eps", _f), ("scaling", _f),
                ("qkv", _Matrix), ("o", _Matrix), ("gate_up", _Matrix), ("down", _Matrix)]


class _Sequence(ctypes.Structure):
    _fields_ = [("keys", _p), ("values", _p), ("layer_stride", ctypes.c_long), ("capacity", _i), ("past", _i)]


_SIGNATURE = [_p, _i, _p, _i, _i, _i, _i, _i, _i, _p, _p, _p, _i]


def span_unfit(lean) -> str | None:
    """Why `lean` (a LeanSpan) cannot take fused decode passes now; None if it can."""
    if lean.dtype != torch.float32 or lean.device.type != "cpu":
        return "not float32 on the CPU"
    if not lean.layers:
        return "no layers"
    if lean.head_dim > 512 or lean.head_dim % 2:
        return f"head_dim {lean.head_dim}"
    for layer in lean.layers:
        if layer.q_norm is not None:
            return "q/k norms"
        if any(b is not None for b in (layer.qkv_bias, layer.o_bias, layer.gate_up_bias, layer.down_bias)):
            return "biases"
        if not isinstance(layer.act, SILU):
            return f"activation {type(layer.act).__name__}"
        if not all(isinstance(getattr(layer, name), ExactWeight) for name in MATRICES):
            return "a matrix not held as one exact compact weight"
    return None


def _matrix(weight: ExactWeight) -> _Matrix:
    return _Matrix(FORMS[weight.format], int(weight.numerics == "fast"), weight.out_features, weight.in_features,
                   weight.codes.data_ptr(), weight.steps.data_ptr() if weight.steps is not None else None,
                   weight.mins.data_ptr() if weight.mins is not None else None)


class FusedDecode:
    """decode.c's passes over one LeanSpan's layers, while they are fit for them (`span_unfit`)."""

    def __init__(self, lean):
        self.lean = lean
        self._key: tuple | None = None
        self._layers = None  # decode.c's table of the layers as they are now (None: unfit)
        self._lib = None
        self.threads: PassThreads | None = None  # one-row passes' thread count, from their timings (first pass on)

    @classmethod
    def of(cls, lean) -> FusedDecode | None:
        """Fused passes for `lean`, or None where none can ever be taken (not float32 on the CPU)."""
        if lean.dtype != torch.float32 or lean.device.type != "cpu":
            return None
        return cls(lean)

    def _table(self):
        """The layers as decode.c reads them, or None where they are unfit; looked at again whenever a matrix is
        replaced (a layout change, quantisation) or its numerics change."""
        key = tuple((id(getattr(layer, name)), getattr(getattr(layer, name), "numerics", None))
                    for layer in self.lean.layers for name in MATRICES)
        if key == self._key:
            return self._layers
        self._key, self._layers = key, None
        reason = span_unfit(self.lean)
        if reason is not None:
            log.debug("decode passes on torch: %s", reason)
            return None
        table = (_Layer * len(self.lean.layers))()
        for slot, layer in zip(table, self.lean.layers):
            slot.input_norm, slot.post_norm = layer.input_norm.data_ptr(), layer.post_norm.data_ptr()
            slot.eps, slot.scaling = layer.eps, layer.scaling
            slot.qkv, slot.o = _matrix(layer.qkv_t), _matrix(layer.o_t)
            slot.gate_up, slot.down = _matrix(layer.gate_up_t), _matrix(layer.down_t)
        self._lib = self.lean.layers[0].qkv_t.kernels.lib
        self._lib.decode_pass.argtypes, self._lib.decode_pass.restype = _SIGNATURE, _i
        self._layers = table
        return table

    def takes(self, rows: list) -> list[bool]:
        """For each row, whether decode.c computes it: the layers are fit, and the row is a decode step that the
        torch path computes in the same way (the same row always goes the same way, alone or in any pass)."""
        if self._table() is None:
            return [False] * len(rows)
        window = self.lean.window
        return [row.hidden.shape[1] == 1 and row.cache is not None and row.mask is None and row.adapter is None
                and row.prompts is None and (window is None or row.past + 1 <= window)
                and row.cache.keys.is_contiguous() for row in rows]

    def run(self, rows: list, start: int, end: int) -> list[torch.Tensor]:
        """Layers [start, end) over `rows` (each one `takes` takes); each row's output hidden states."""
        lean = self.lean
        # a copy (computed in place), in float32 whatever the wire's dtype
        x = torch.cat([row.hidden.reshape(-1, row.hidden.shape[-1]) for row in rows]).to(torch.float32)
        cos, sin = lean._rotary(x, rows)
        cos, sin = cos.reshape(x.shape[0], -1).contiguous(), sin.reshape(x.shape[0], -1).contiguous()
        count = x.shape[0]
        sequences = (_Sequence * count)()
        slot = 0
        for row in rows:
            cache = row.cache
            if row.past + 1 > cache.capacity:
                cache._grow(row.past + 1)
            keys, values = cache.keys, cache.values
            batch_stride = keys.stride(1) * keys.element_size()
            for b in range(row.hidden.shape[0]):
                sequences[slot] = _Sequence(keys.data_ptr() + b * batch_stride, values.data_ptr() + b * batch_stride,
                                            keys.stride(0), keys.shape[3], row.past)
                slot += 1
        # the table `takes` found fit, from layer `start` on
        first = ctypes.addressof(self._layers) + (start - lean.start) * ctypes.sizeof(_Layer)
        weight = lean.layers[start - lean.start].qkv_t
        threads = weight._threads(count, None)
        if count == 1:  # one session decoding: the thread count its passes have been fastest on
            if self.threads is None:
                self.threads = PassThreads((1, saved_threads() or torch.get_num_threads()), threads)
            threads = self.threads.pick()
        began = time.perf_counter()
        failed = self._lib.decode_pass(first, end - start, x.data_ptr(), count, x.shape[1], lean.q_heads,
                                      lean.kv_heads, lean.head_dim, lean.layers[0].down_t.in_features,
                                      cos.data_ptr(), sin.data_ptr(), ctypes.addressof(sequences), threads)
        if count == 1:
            self.threads.record(threads, time.perf_counter() - began)
        if failed:
            raise MemoryError(f"no memory for a {count}-row decode pass's scratch")
        outputs, offset = [], 0
        for row in rows:
            size = row.hidden.shape[0]
            outputs.append(x[offset: offset + size].view(row.hidden.shape))
            offset += size
            row.cache.length = row.past + 1
        return outputs

