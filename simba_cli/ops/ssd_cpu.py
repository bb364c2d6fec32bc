"""The within-chunk part of the chunked SSD scan on CPU (numba), float32, for inference.

For one chunk of Q tokens and one head h, with a_t = dt_t A_h <= 0 (`models.mamba2.ssd_scan_chunked`):

    seg[t, s]      = a_{s+1} + ... + a_t                  (s <= t; 0 on the diagonal)
    y[t]           = sum_{s <= t} exp(seg[t, s]) scores[t, s] dt_s x_s + D_h x_t,   scores = C_t . B_s
    u[s]           = exp(seg[Q-1, s]) dt_s x_s            x_s decayed to the chunk's end: what the chunk adds
                                                          to the state there is B^T u
    w_out[t]       = exp(a_0 + ... + a_t)                 from the chunk's start to t

PyTorch builds seg with a masked fill, a running sum and a second masked fill, takes exp, multiplies by the
scores and steps, then multiplies by x in a batched product over (chunk, head) that first copies x into a
(chunk, head)-major layout, and scales x once more for u: passes over (b, c, H, Q, Q) and (b, l, H, P) tensors.
Here each (chunk, head) is one task that builds row t of the weights in registers (row t of seg is row t-1 plus
a_t: the same sums, of non-positive terms, as PyTorch's, so exp never exceeds 1), exponentiated by `numba_math`'s
vectorised exp2, and adds the row's products with x into y[t] at once, reading x where it lies (a slice of the
conv's output). Terms below 2^-126 are set to zero. Gradients are not needed here: training keeps the PyTorch
path, which autograd differentiates.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba import prange

from simba_cli.ops.numba_math import LOG2E, X_MIN, exp2_bits, exp2_poly, f32, f32_flat_rows


@nb.njit(inline="always", fastmath=True)
def _exp_into(x, out, n, p, ebits):
    """out[:n] = exp(x[:n]) for x <= 0; 0 where it would be below 2^-126."""
    e2 = ebits.view(np.float32)
    for j in range(n):
        e = x[j] * LOG2E
        live = np.float32(e > X_MIN)
        e = max(e, X_MIN)
        k = np.floor(e)
        p[j] = exp2_poly(e - k) * live
        ebits[j] = exp2_bits(k)
    for j in range(n):
        out[j] = p[j] * e2[j]


@nb.njit(parallel=True, fastmath=True, cache=True)
def _within_chunks(a, dt, scores, x, row_stride, D, heads_per_group, y, u, w_out):
    nb_, nc, nh, q = a.shape
    hp = y.shape[-1] // nh
    for task in prange(nb_ * nc * nh):
        bi = task // (nc * nh)
        ci = (task // nh) % nc
        h = task % nh
        seg = np.zeros(q, np.float32)
        cum = np.empty(q, np.float32)
        ex = np.empty(q, np.float32)
        w = np.empty(q, np.float32)
        p = np.empty(q, np.float32)
        ebits = np.empty(q, np.int32)
        acc = np.empty(hp, np.float32)
        a_h = a[bi, ci, h]
        dt_h = dt[bi, ci, h]
        d_h = D[h]
        first = (bi * nc + ci) * q  # the chunk's first row of x, y and u
        col = h * hp
        x0 = first * row_stride + col  # where the head's channels of the chunk's first token start in x
        total = np.float32(0.0)
        for t in range(q):
            for s in range(t):
                seg[s] += a_h[t]
            seg[t] = 0.0
            total += a_h[t]
            cum[t] = total
            _exp_into(seg, ex, t + 1, p, ebits)
            sc = scores[bi, ci, h // heads_per_group, t]
            for s in range(t + 1):
                w[s] = ex[s] * sc[s] * dt_h[s]
            # 1-d slices of contiguous channels, not computed indices: LLVM vectorises only these loops
            x_t = x[x0 + t * row_stride:x0 + t * row_stride + hp]
            for j in range(hp):
                acc[j] = d_h * x_t[j]
            for s in range(t + 1):
                ws = w[s]
                x_s = x[x0 + s * row_stride:x0 + s * row_stride + hp]
                for j in range(hp):
                    acc[j] += ws * x_s[j]
            y_t = y[first + t, col:col + hp]
            for j in range(hp):
                y_t[j] = acc[j]
        _exp_into(seg, w, q, p, ebits)  # w is now exp(seg[Q-1, s]): the decay from s to the chunk's end
        for s in range(q):
            ws = w[s] * dt_h[s]
            x_s = x[x0 + s * row_stride:x0 + s * row_stride + hp]
            u_s = u[first + s, col:col + hp]
            for j in range(hp):
                u_s[j] = ws * x_s[j]
        _exp_into(cum, w_out[bi, ci, h], q, p, ebits)


def within_chunks(a: torch.Tensor, dt: torch.Tensor, scores: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None,
                  heads_per_group: int):
    """a (b, c, H, Q) = dt A, non-positive; dt (b, c, H, Q); scores (b, c, G, Q, Q) = C_t . B_s, head h reading
    group h // heads_per_group; x (b, c Q, H, P) (any strides with contiguous heads' channels); D (H,) or None
    -> y (b, c Q, H, P) with the D skip, u (b, c Q, H, P), w_out (b, c, H, Q), float32."""
    b, c, h, q = a.shape
    P = x.shape[-1]
    y, u, w_out = torch.empty(b, c * q, h, P), torch.empty(b, c * q, h, P), torch.empty(b, c, h, q)
    x_flat, row_stride = f32_flat_rows(x.flatten(2))
    skip = torch.zeros(h) if D is None else D
    _within_chunks(*(f32(t) for t in (a, dt, scores)), x_flat, row_stride, f32(skip), heads_per_group,
                   y.view(b * c * q, h * P).numpy(), u.view(b * c * q, h * P).numpy(), w_out.numpy())
    return y, u, w_out
