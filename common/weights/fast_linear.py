"""Linear layers with their weight stored transposed, for CPU decoding.

For one-token steps on CPU, `x @ W_t` with `W_t` contiguous ([in, out]) is ~25 % faster than
`F.linear(x, W)` with W [out, in] (measured on SmolLM2's shapes: 46 -> 36 ms for all matrix
products of one token; its 49152-row head 10 -> 5 ms). Results equal F.linear's up to float
rounding (the products are summed in another order)."""

from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Module):
    """Drop-in for nn.Linear in inference: same call, same `weight` (a view), faster on CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight_t = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "TransposedLinear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight_t
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def transpose_linears(module: nn.Module) -> int:
    """Replace every plain nn.Linear inside `module` by a TransposedLinear; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, TransposedLinear.from_linear(child))
            count += 1
        else:
            count += transpose_linears(child)
    return count


# -- MKL's packed sgemm ---------------------------------------------------------------------------
def mkl_packing_available() -> bool:
    """Whether this torch has MKL's packed sgemm (x86 builds with MKL; not ARM or macOS builds)."""
    try:
        return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


PACK_ROWS = 8
PACKED_ROWS = range(2, 33)  # products that run faster packed (one row is ~5-10 % slower; prefills gain little)


class PackedWeight:
    """A float32 CPU weight re-laid out once for MKL's packed sgemm (`cblas_sgemm_pack`); `linear(x, bias)`
    is `x @ W_t + bias` for any number of rows.

    Why: an ordinary sgemm re-packs the whole weight matrix on every call with two or more rows, so on this
    2-core CPU the products of SmolLM2's 30 layers take 27 ms for one row but 49 ms for two, 50 for eight
    (`x @ W_t`). Packed once, they take 27-31 ms for one or two rows and 34 for eight: batching the steps of
    concurrent sessions becomes almost free, but one row costs ~5-10 % more (so node/runtime/layout.py packs
    only while passes batch). The packed copy takes about the weight's memory (138 MB resident for 135 MB
    of matrices) and replaces it. Results equal `x @ W_t` up to float rounding.

    The weights are frozen; a product that needs gradients (a node's Backward) recovers `W_t` from the
    packed copy for that call (a product with the identity matrix: exact) to pass the gradient back."""

    def __init__(self, weight_t: torch.Tensor):
        if weight_t.dtype != torch.float32 or weight_t.device.type != "cpu" or weight_t.dim() != 2:
            raise ValueError("MKL packing takes a 2-D float32 CPU matrix")
        self.in_features, self.out_features = weight_t.shape
        # the row count given here picks MKL's layout: packed for 1 row, products of more rows are as slow as
        # unpacked; packed for 8, products of 1 to 16 rows are all fast (the buffer's size is the same)
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight_t.t().contiguous(), PACK_ROWS)
        # the op reads only the shape of its `origin_weight` argument when the row count matches: no memory
        self._shape = torch.zeros((), dtype=torch.float32).expand(self.out_features, self.in_features)
        # torch sizes the opaque tensor by MKL's size query, which counts bytes: that many are written
        self.nbytes = int(self.packed.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return []  # opaque (no storage to count); `nbytes` says its size

    def product(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // self.in_features
        return torch.ops.mkl._mkl_linear(x.contiguous(), self.packed, self._shape, bias, rows)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return frozen_linear(self, x, bias)

    def matrix(self) -> torch.Tensor:
        """W [out, in] again (for gradients)."""
        return self.unpack().t()

    def unpack(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of W_t ([in, out]) again: the packed product of those rows of the identity matrix
        (each output is one weight times 1 plus zeros, so exact). A whole matrix costs in x in x out
        multiply-adds; in pieces, other work can run between them."""
        stop = self.in_features if stop is None else stop
        rows = torch.arange(stop - start)
        unit = torch.zeros(stop - start, self.in_features, dtype=torch.float32)
        unit[rows, rows + start] = 1.0
        return self.product(unit)


def frozen_linear(weight, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T + bias for a frozen weight held in another layout (PackedWeight here, common/weights/exact.py's
    ExactWeight): its own `product(x, bias)`, and gradients to x and bias (a node's Backward) through `matrix()`."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _FrozenProduct.apply(x, bias, weight)
    return weight.product(x, bias)


class _FrozenProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, weight) -> torch.Tensor:
        ctx.weight, ctx.has_bias = weight, bias is not None
        return weight.product(x, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ ctx.weight.matrix() if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


