"""The models' dense projections, y = x W^T + b, with one dispatch for CPU inference.

    x      : (..., k)
    weight : (n, k)
    bias   : (n,) or None
    out    : (..., n)

On CPU, in float32 and where no gradient is needed, the product runs through oneDNN's matmul
(`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU backend calls) rather than
`F.linear`'s BLAS call. On the CPU this was measured on (an AMD EPYC, Zen 4, two cores) a mamba-130m
forward's products at l=1024 ran 1.15-1.45x as fast, and a decoding step's matrix-vector products 1.7x;
`python benchmarks/bench_core.py` measures the two side by side (the `*_onednn_speedup` keys). Results
agree with `F.linear` to float32 rounding (another summation order); SIMBA_ONEDNN=0 runs `F.linear`
everywhere.

Everything else is `F.linear`: training, other devices and dtypes, small weights (where a call's fixed
cost dominates), and CPUs other than x86-64, where torch's oneDNN may lack its tuned kernels while the
platform's BLAS has them (Apple's runs on the chips' matrix units).
"""

from __future__ import annotations

import functools
import os
import platform

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
    if not (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()):
        return False
    # A private op: one probe, so that a torch that changed or dropped it falls back to F.linear.
    try:
        x, w = torch.arange(6.0).reshape(2, 3), torch.arange(12.0).reshape(4, 3)
        return torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w))
    except Exception:
        return False


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
