"""Causal depthwise convolution over time, token-major layout, with an optional fused SiLU.

    x      : (b, l, D)
    weight : (D, k)       one filter of width k per channel
    bias   : (D,) or None
    out[b, t, d] = sum_i weight[d, i] * x[b, t - k + 1 + i, d] + bias[d]    (x before 0 counts as 0)

On CPU a compiled numba kernel (`conv_cpu`) in float32/16; on CUDA the `causal-conv1d` package when
installed (part of the GPU extra); elsewhere PyTorch's grouped conv1d. Right padding never reaches
real tokens, since the filter only looks back.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _causal_conv1d_fn():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


def causal_conv1d(x, weight, bias=None, silu: bool = True):
    if x.is_cuda and _causal_conv1d_fn() is not None:
        fn = _causal_conv1d_fn()
        out = fn(causal_conv1d_layout(x), weight, bias, activation="silu" if silu else None)
        return out.transpose(1, 2)
    if x.device.type == "cpu" and x.dtype != torch.float64:
        from simba_cli.ops.conv_cpu import CpuCausalConv

        return CpuCausalConv.apply(x, weight, bias, silu)
    return causal_conv1d_ref(x, weight, bias, silu)


def causal_conv1d_layout(x: torch.Tensor) -> torch.Tensor:
    """x (b, l, D) as causal-conv1d's (b, D, l): x's own memory ("channel last") where the kernel accepts it (D and
    the batch and row strides multiples of 8), else a contiguous copy. A slice of a projection's output (Mamba-2's
    xBC, row stride d_in_proj) often is not: the kernel refuses it rather than copying."""
    xt = x.transpose(1, 2)
    if x.stride(2) == 1 and x.shape[2] % 8 == 0 and x.stride(1) % 8 == 0 and x.stride(0) % 8 == 0:
        return xt
    return xt.contiguous()


def causal_conv1d_ref(x, weight, bias=None, silu: bool = True):
    """PyTorch's grouped conv1d: the reference for the other paths."""
    k = weight.shape[-1]
    xt = F.pad(x.transpose(1, 2), (k - 1, 0))
    out = F.conv1d(xt, weight.unsqueeze(1), bias, groups=weight.shape[0]).transpose(1, 2)
    return F.silu(out) if silu else out


def conv_state_at(x, lengths, k: int):
    """The last k inputs before each sequence's end, (b, D, k), as the recurrent conv state.

    x: (b, l, D); lengths: (b,) or None. Positions before the start are zeros.
    """
    b, l, d = x.shape
    ends = torch.full((b,), l, device=x.device) if lengths is None else lengths.to(x.device)
    idx = ends[:, None] - k + torch.arange(k, device=x.device)[None, :]  # (b, k)
    valid = idx >= 0
    gathered = torch.gather(x, 1, idx.clamp(min=0)[..., None].expand(b, k, d))
    return (gathered * valid[..., None].to(x.dtype)).transpose(1, 2).contiguous()
