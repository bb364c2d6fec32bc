"""The models' dense projections, y = x W^T + b, with one dispatch for CPU inference.

    x      : (..., k)
    weight : (n, k)
    bias   : (n,) or None
    out    : (..., n)

On CPU, in float32 and where no gradient is needed, the product runs through oneDNN's matmul
(`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU backend calls) rather than
`F.linear`'s BLAS call. On CPUs where the two differ, oneDNN was the faster: on an AMD EPYC (Zen 4,
two cores) it ran a mamba-130m in_proj at l=1024 1.2-1.6x as fast, and a matrix-vector product (one
decoding step) 1.5-3x as fast. `python benchmarks/bench_core.py` measures the two side by side
(`*_matmuls_onednn_speedup`). Results agree with `F.linear` to float32 rounding (a different summation
order); set SIMBA_ONEDNN=0 to run `F.linear` everywhere.

Everything else (training, other devices and dtypes, small weights where a call's fixed cost
dominates) is `F.linear`.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

# Weights under 2^18 elements (1 MiB in float32) stay with F.linear: oneDNN's fixed cost per call
# (a few microseconds) made matrix-vector products with the smallest weights slower, not faster.
ONEDNN_MIN_WEIGHT = 1 << 18


@functools.cache
def onednn_available() -> bool:
    if os.environ.get("SIMBA_ONEDNN", "1") == "0":
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear(x, weight, bias)` runs through oneDNN."""
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not needs_grad
            and weight.numel() >= ONEDNN_MIN_WEIGHT and x.numel() > 0 and onednn_available())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if uses_onednn(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
