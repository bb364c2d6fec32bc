"""The compiled CPU causal depthwise convolution with fused SiLU (numba), forward and backward, float32.

Token-major like the rest of the package, so no transposes or copies around it: the forward reads its input
in place, also when it is a slice of a wider projection's output. Shapes and contract
as `ops.conv.causal_conv1d`: x (b, l, D), weight (D, k), bias (D,).
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba import prange

from simba_cli.ops.numba_math import channel_chunks, f32, f32_flat_rows, silu_inplace


@nb.njit(parallel=True, fastmath=True, cache=True)
def _conv_fwd(x, row_stride, wT, bias, silu, out, width):
    # x: the input's rows, token (bi, t) starting at x[(bi * nl + t) * row_stride] (`numba_math.f32_flat_rows`);
    # wT: (k, D), the filter transposed so that a chunk of channels is contiguous.
    nb_, nl, nd = out.shape
    k = wT.shape[0]
    n_chunks = (nd + width - 1) // width
    for task in prange(nb_ * n_chunks):
        bi = task // n_chunks
        d0 = (task % n_chunks) * width
        w = min(nd, d0 + width) - d0
        acc = np.empty(w, np.float32)
        p = np.empty(w, np.float32)
        ebits = np.empty(w, np.int32)
        for t in range(nl):
            acc[:] = bias[d0:d0 + w]
            for i in range(max(0, k - 1 - t), k):
                at = (bi * nl + t - k + 1 + i) * row_stride + d0
                xs = x[at:at + w]
                wi = wT[i, d0:d0 + w]
                for j in range(w):
                    acc[j] += wi[j] * xs[j]
            if silu:
                silu_inplace(acc, p, ebits)
            out[bi, t, d0:d0 + w] = acc


@nb.njit(parallel=True, fastmath=True, cache=True)
def _conv_bwd(x, wT, bias, silu, gout, gx, gw_part, gb_part, width):
    nb_, nl, nd = x.shape
    k = wT.shape[0]
    n_chunks = (nd + width - 1) // width
    for task in prange(nb_ * n_chunks):
        bi = task // n_chunks
        d0 = (task % n_chunks) * width
        w = min(nd, d0 + width) - d0
        pre = np.empty(w, np.float32)
        act = np.empty(w, np.float32)
        p = np.empty(w, np.float32)
        ebits = np.empty(w, np.int32)
        gpre = np.empty((nl, w), np.float32)
        gw = np.zeros((k, w), np.float32)
        gb = np.zeros(w, np.float32)
        for t in range(nl):
            pre[:] = bias[d0:d0 + w]
            for i in range(max(0, k - 1 - t), k):
                xs = x[bi, t - k + 1 + i, d0:d0 + w]
                wi = wT[i, d0:d0 + w]
                for j in range(w):
                    pre[j] += wi[j] * xs[j]
            g = gout[bi, t, d0:d0 + w]
            if silu:
                act[:] = pre
                silu_inplace(act, p, ebits)
                for j in range(w):
                    # silu'(x) = s + x s (1 - s), with s = sigmoid(x) = silu(x) / x
                    s = act[j] / pre[j] if pre[j] != 0 else np.float32(0.5)
                    gpre[t, j] = g[j] * (s + act[j] * (np.float32(1.0) - s))
            else:
                gpre[t] = g
            for j in range(w):
                gb[j] += gpre[t, j]
            for i in range(max(0, k - 1 - t), k):
                xs = x[bi, t - k + 1 + i, d0:d0 + w]
                for j in range(w):
                    gw[i, j] += gpre[t, j] * xs[j]
        for t in range(nl):
            acc = pre  # reuse as scratch
            acc[:] = 0.0
            for i in range(k):
                src = t + k - 1 - i
                if src < nl:
                    wi = wT[i, d0:d0 + w]
                    for j in range(w):
                        acc[j] += wi[j] * gpre[src, j]
            gx[bi, t, d0:d0 + w] = acc
        gw_part[bi, :, d0:d0 + w] = gw
        gb_part[bi, d0:d0 + w] = gb


class CpuCausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu: bool):
        b, l, d = x.shape
        bias_ = torch.zeros(d) if bias is None else bias
        out = torch.empty(b, l, d, dtype=torch.float32)
        _conv_fwd(*f32_flat_rows(x), f32(weight.t()), f32(bias_), silu, out.numpy(), channel_chunks(b, d))
        ctx.save_for_backward(x, weight, bias_)
        ctx.silu, ctx.has_bias = silu, bias is not None
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, gout):
        x, weight, bias_ = ctx.saved_tensors
        b, l, d = x.shape
        gx = torch.empty(b, l, d)
        gw_part, gb_part = torch.empty(b, weight.shape[1], d), torch.empty(b, d)
        _conv_bwd(f32(x), f32(weight.t()), f32(bias_), ctx.silu, f32(gout), gx.numpy(), gw_part.numpy(),
                  gb_part.numpy(), channel_chunks(b, d))
        gb = gb_part.sum(0).to(bias_.dtype) if ctx.has_bias else None
        return gx.to(x.dtype), gw_part.sum(0).t().to(weight.dtype), gb, None
