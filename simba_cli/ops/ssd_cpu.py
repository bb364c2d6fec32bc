"""The within-chunk decays of the chunked SSD scan on CPU (numba), float32, for inference.

For one chunk of Q tokens and one head, with a_t = dt_t A_h <= 0 (`models.mamba2.ssd_scan_chunked`):

    seg[t, s]      = a_{s+1} + ... + a_t                  (s <= t; 0 on the diagonal)
    weights[t, s]  = exp(seg[t, s]) scores[t, s] dt_s     (s <= t; 0 above the diagonal), scores = C_t . B_s
    w_in[s]        = exp(seg[Q-1, s]) dt_s                from s to the chunk's end, times the step
    w_out[t]       = exp(a_0 + ... + a_t)                 from the chunk's start to t

PyTorch builds seg with a masked fill, a running sum and a second masked fill, then takes exp and multiplies
by the scores and steps, each a pass over a (b, c, H, Q, Q) tensor; here each (chunk, head) is one task that builds its
rows in registers: row t of seg is row t-1 plus a_t (the same sums, of non-positive terms, as PyTorch's, so
exp never exceeds 1), exponentiated by `numba_math`'s vectorised exp2. Terms below 2^-126 are set to zero.
Gradients are not needed here: training keeps the PyTorch path, which autograd differentiates.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba import prange

from simba_cli.ops.numba_math import LOG2E, X_MIN, exp2_bits, exp2_poly, f32


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
def _chunk_decays(a, dt, scores, heads_per_group, weights, w_in, w_out):
    nb_, nc, nh, q = a.shape
    for task in prange(nb_ * nc * nh):
        bi = task // (nc * nh)
        ci = (task // nh) % nc
        h = task % nh
        seg = np.zeros(q, np.float32)
        cum = np.empty(q, np.float32)
        ex = np.empty(q, np.float32)
        p = np.empty(q, np.float32)
        ebits = np.empty(q, np.int32)
        a_h = a[bi, ci, h]
        dt_h = dt[bi, ci, h]
        total = np.float32(0.0)
        for t in range(q):
            for s in range(t):
                seg[s] += a_h[t]
            seg[t] = 0.0
            total += a_h[t]
            cum[t] = total
            _exp_into(seg, ex, t + 1, p, ebits)
            sc = scores[bi, ci, h // heads_per_group, t]
            row = weights[bi, ci, h, t]
            for s in range(t + 1):
                row[s] = ex[s] * sc[s] * dt_h[s]
            for s in range(t + 1, q):
                row[s] = 0.0
        into = w_in[bi, ci, h]
        _exp_into(seg, into, q, p, ebits)
        for s in range(q):
            into[s] *= dt_h[s]
        _exp_into(cum, w_out[bi, ci, h], q, p, ebits)


def chunk_decays(a: torch.Tensor, dt: torch.Tensor, scores: torch.Tensor, heads_per_group: int):
    """a (b, c, H, Q) = dt A, non-positive; dt (b, c, H, Q); scores (b, c, G, Q, Q) = C_t . B_s, head h reading
    group h // heads_per_group -> weights (b, c, H, Q, Q), w_in (b, c, H, Q), w_out (b, c, H, Q), float32."""
    b, c, h, q = a.shape
    weights, w_in, w_out = torch.empty(b, c, h, q, q), torch.empty(b, c, h, q), torch.empty(b, c, h, q)
    _chunk_decays(*(f32(t) for t in (a, dt, scores)), heads_per_group, weights.numpy(), w_in.numpy(), w_out.numpy())
    return weights, w_in, w_out
