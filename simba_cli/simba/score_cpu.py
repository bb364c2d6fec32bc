"""The Simba score on CPU (numba), float32: one pass over time per chunk of channels, no (b, l, D, N) tensor.

For each sequence and chunk of channels, walk t from T down to 0 carrying S_t = sum_{k=t+1..T} dt_k in
a register row, evaluate sum_n C_T[n] B_t[n] exp(A[:, n] S_t) with the vectorised exp of `numba_math`,
multiply by dt_t u_t (and the gate at T), and keep the chunk's maximum over its channels. The wrapper
takes the maximum over chunks. Cost: one exp per (token, channel, state), like one scan, but without
the scan's recurrence and stores, so less than one scan in time.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba import prange

from simba_cli.ops.numba_math import LOG2E, X_MAX, X_MIN, channel_chunks, exp2_bits, exp2_poly


@nb.njit(parallel=True, fastmath=True, cache=True)
def _score(u, dt, A2, B, C, last_idx, absolute, has_gate, gate_T, out, width):
    nb_, nl, nd = u.shape
    ns = A2.shape[0]
    n_chunks = (nd + width - 1) // width
    for task in prange(nb_ * n_chunks):
        bi = task // n_chunks
        chunk = task % n_chunks
        d0 = chunk * width
        w = min(nd, d0 + width) - d0
        T = last_idx[bi]
        S = np.zeros(w, np.float32)
        acc = np.empty(w, np.float32)
        p = np.empty(w, np.float32)
        ebits = np.empty(w, np.int32)
        e2 = ebits.view(np.float32)
        c_T = C[bi, T]
        g = gate_T[bi, d0:d0 + w]
        for t in range(T, -1, -1):
            acc[:] = 0.0
            b_t = B[bi, t]
            for n in range(ns):
                cb = c_T[n] * b_t[n]
                an = A2[n, d0:d0 + w]
                for j in range(w):
                    e = min(max(S[j] * an[j], X_MIN), X_MAX)
                    k = np.floor(e)
                    p[j] = exp2_poly(e - k)
                    ebits[j] = exp2_bits(k)
                for j in range(w):
                    acc[j] += cb * p[j] * e2[j]
            dtt = dt[bi, t, d0:d0 + w]
            ut = u[bi, t, d0:d0 + w]
            best = np.float32(-np.inf)
            for j in range(w):
                v = acc[j] * dtt[j] * ut[j]
                if has_gate:
                    v *= g[j]
                if absolute:
                    v = abs(v)
                best = max(best, v)
                S[j] += dtt[j]
            out[bi, chunk, t] = best


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def simba_score_cpu(u, dt, A, B, C, last_idx, absolute: bool = False, gate_T=None) -> torch.Tensor:
    """Scores (b, l) float32, -inf after each sequence's last token. dt positive, zero on padding.

    gate_T: (b, D) = silu(z) at each sequence's last token, or None.
    """
    b, l, d = u.shape
    width = channel_chunks(b, d)
    n_chunks = -(-d // width)
    out = torch.full((b, n_chunks, l), float("-inf"))
    gate = np.ones((b, d), np.float32) if gate_T is None else _f32(gate_T)
    _score(_f32(u), _f32(dt), _f32(A.t() * float(LOG2E)), _f32(B), _f32(C),
           last_idx.detach().to(torch.int64).cpu().numpy(), bool(absolute), gate_T is not None, gate,
           out.numpy(), width)
    return out.amax(dim=1)
