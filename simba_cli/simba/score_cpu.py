"""The Simba score on CPU (numba), float32: one pass over time per chunk of channels, no (b, l, D, N) tensor.

The kernel computes the general weighted form every Simba-like criterion reduces to,

    v_t[d] = dt_t[d] u_t[d] sum_n W[d, n] B_t[n] exp(A[d, n] S_t[d]),   S_t = sum_{k=t+1..start} dt_k,

for t <= start, and its maximum over the channels d a sequence uses (optionally |v|, or v times a gate).
Simba is W[d, n] = C_T[n], start = T; the windowed variant passes the window's accumulated weights
(`simba.criteria_beyond`). For each sequence and chunk of channels, walk t from `start` down to 0 carrying
S_t in a register row, evaluate the sum over n with the vectorised exp2 of `numba_math` (terms decayed below
2^-64 set to zero), and keep the
chunk's maximum; the wrapper takes the maximum over chunks. Cost: one exp per (token, channel, state), like
one scan, but without the scan's recurrence and stores, so less than one scan in time.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba import prange

from simba_cli.ops.numba_math import LOG2E, channel_chunks, exp2_bits, exp2_poly

# Terms decayed below 2^-64 (5e-20 of their undecayed size) count as zero: left in, their products fall to
# subnormal floats, which x86 handles about ten times slower (a mamba-130m layer at 2048 tokens: 87 ms,
# not 7). No score in float32 resolves them next to the terms that matter.
NEGLIGIBLE = np.float32(-64.0)


# fastmath lets the compiler assume no infinities, so the kernel never makes one: a chunk whose channels are all
# masked out reports NONE, which the wrapper turns into -inf (without the flag the kernel is ~20% slower)
NONE = np.float32(-3.0e38)


@nb.njit(parallel=True, fastmath=True, cache=True)
def _score(u, dt, A2, B, W, start, absolute, has_gate, gate, use, out, width):
    nb_, nl, nd = u.shape
    ns = A2.shape[0]
    n_chunks = (nd + width - 1) // width
    for task in prange(nb_ * n_chunks):
        bi = task // n_chunks
        chunk = task % n_chunks
        d0 = chunk * width
        w = min(nd, d0 + width) - d0
        T = start[bi]
        S = np.zeros(w, np.float32)
        acc = np.empty(w, np.float32)
        p = np.empty(w, np.float32)
        ebits = np.empty(w, np.int32)
        e2 = ebits.view(np.float32)
        g = gate[bi, d0:d0 + w]
        used = use[bi, d0:d0 + w]
        for t in range(T, -1, -1):
            acc[:] = 0.0
            b_t = B[bi, t]
            for n in range(ns):
                an = A2[n, d0:d0 + w]
                wn = W[bi, n, d0:d0 + w]
                for j in range(w):
                    e = S[j] * an[j]  # <= 0
                    live = np.float32(e > NEGLIGIBLE)
                    e = max(e, NEGLIGIBLE)
                    k = np.floor(e)
                    p[j] = exp2_poly(e - k) * live
                    ebits[j] = exp2_bits(k)
                bn = b_t[n]
                for j in range(w):
                    acc[j] += bn * wn[j] * p[j] * e2[j]
            dtt = dt[bi, t, d0:d0 + w]
            ut = u[bi, t, d0:d0 + w]
            best = NONE
            for j in range(w):
                v = acc[j] * dtt[j] * ut[j]
                if has_gate:
                    v *= g[j]
                if absolute:
                    v = abs(v)
                if used[j]:
                    best = max(best, v)
                S[j] += dtt[j]
            out[bi, chunk, t] = best


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def weighted_score_cpu(u, dt, A, B, W, start, absolute: bool = False, gate=None, use=None) -> torch.Tensor:
    """max over the used channels of v_t[d] (module docstring), (b, l) float32; -inf after each `start`.

    u, dt (b, l, D), dt positive and zero on padding; A (D, N); B (b, l, N); W (b, D, N); start (b,) int;
    gate (b, D) multiplies v (None: 1); use (b, D) bool, the channels the maximum reads (None: all)."""
    b, l, d = u.shape
    width = channel_chunks(b, d)
    n_chunks = -(-d // width)
    out = torch.full((b, n_chunks, l), float("-inf"))
    gate_np = np.ones((b, d), np.float32) if gate is None else _f32(gate)
    use_np = np.ones((b, d), np.bool_) if use is None else use.detach().cpu().bool().contiguous().numpy()
    _score(_f32(u), _f32(dt), _f32(A.t() * float(LOG2E)), _f32(B), _f32(W.transpose(1, 2)),
           start.detach().to(torch.int64).cpu().numpy(), bool(absolute), gate is not None, gate_np, use_np,
           out.numpy(), width)
    best = out.amax(dim=1)
    return best.masked_fill(best <= float(NONE), float("-inf"))
