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
