"""The compiled CPU selective scan (numba), forward and backward, float32.

The kernels compute the recurrence
    h_t = exp(dt_t A) * h_{t-1} + dt_t * B_t * u_t,    y_t = C_t . h_t + D_skip * u_t
over the real tokens (padding's outputs are zero). For training, `ops.scan` hands the forward a positive dt
(softplus and bias applied) and applies the gate silu(z) itself, with vectorised PyTorch ops that autograd
differentiates. Without gradients the forward takes delta, bias and z and does softplus and the gate
itself, so that they cost no passes over (b, l, D) of their own. Shapes as in `scan_ref`. Work is split
into tasks of (sequence, chunk of channels), run in parallel; inside a task the loop runs over time and
state, and the innermost loop over the chunk's channels is vectorised (see `numba_math`).

Backward recomputes the states instead of storing (b, l, D, N) of them: a first pass keeps the state at
the start of every segment of K steps, then segments are replayed last to first, each one recomputed
forward into a (K, N, width) buffer and differentiated in reverse. dB and dC are sums over channels, so
every task writes its partial sums and the wrapper adds them up.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba import prange

from simba_cli.ops.numba_math import (
    LOG2E,
    X_MAX,
    X_MIN,
    channel_chunks,
    exp2_bits,
    exp2_poly,
    f32,
    f32_rows,
    silu_inplace,
    softplus_inplace,
)

SEGMENT = 32  # backward replay segment length (time steps)


@nb.njit(parallel=True, fastmath=True, cache=True)
def _scan_fwd(u, dt, bias, dt_softplus, z, gate, A2, B, C, Dskip, lengths, y, last_state, width):
    # dt_t = softplus(dt[t] + bias) when dt_softplus, else dt[t] + bias; y_t *= silu(z_t) when gate.
    nb_, nl, nd = u.shape
    ns = A2.shape[0]
    n_chunks = (nd + width - 1) // width
    for task in prange(nb_ * n_chunks):
        bi = task // n_chunks
        d0 = (task % n_chunks) * width
        w = min(nd, d0 + width) - d0
        seq_len = lengths[bi]
        h = np.zeros((ns, w), np.float32)
        p = np.empty(w, np.float32)
        ebits = np.empty(w, np.int32)
        e2 = ebits.view(np.float32)
        ys = np.empty(w, np.float32)
        dtu = np.empty(w, np.float32)
        dtt = np.empty(w, np.float32)
        zt = np.empty(w, np.float32)
        dsk = Dskip[d0:d0 + w]
        for t in range(seq_len):
            ut = u[bi, t, d0:d0 + w]
            for j in range(w):
                dtt[j] = dt[bi, t, d0 + j] + bias[d0 + j]
            if dt_softplus:
                softplus_inplace(dtt, p, ebits)
            for j in range(w):
                dtu[j] = dtt[j] * ut[j]
                ys[j] = dsk[j] * ut[j]
            for n in range(ns):
                bn = B[bi, t, n]
                cn = C[bi, t, n]
                an = A2[n, d0:d0 + w]
                hn = h[n]
                for j in range(w):
                    e = min(max(dtt[j] * an[j], X_MIN), X_MAX)
                    k = np.floor(e)
                    p[j] = exp2_poly(e - k)
                    ebits[j] = exp2_bits(k)
                for j in range(w):
                    hv = p[j] * e2[j] * hn[j] + bn * dtu[j]
                    hn[j] = hv
                    ys[j] += cn * hv
            if gate:
                for j in range(w):
                    zt[j] = z[bi, t, d0 + j]
                silu_inplace(zt, p, ebits)
                for j in range(w):
                    ys[j] *= zt[j]
            y[bi, t, d0:d0 + w] = ys
        for t in range(seq_len, nl):
            y[bi, t, d0:d0 + w] = 0.0
        for j in range(w):
            for n in range(ns):
                last_state[bi, d0 + j, n] = h[n, j]


@nb.njit(inline="always", fastmath=True)
def _decay(dtt, an, p, ebits):
    """p * (ebits as float32) = exp(dt * A) over a chunk of channels; `an` holds A * log2(e)."""
    for j in range(dtt.shape[0]):
        e = min(max(dtt[j] * an[j], X_MIN), X_MAX)
        k = np.floor(e)
        p[j] = exp2_poly(e - k)
        ebits[j] = exp2_bits(k)


@nb.njit(parallel=True, fastmath=True, cache=True)
def _scan_bwd(u, dt, A2, A, B, C, Dskip, lengths, gy, gu, gdt, gA_part, gD_part, gB_part, gC_part, width, seg):
    nb_, nl, nd = u.shape
    ns = A2.shape[0]
    n_chunks = (nd + width - 1) // width
    for task in prange(nb_ * n_chunks):
        bi = task // n_chunks
        chunk = task % n_chunks
        d0 = chunk * width
        w = min(nd, d0 + width) - d0
        seq_len = lengths[bi]
        n_seg = max(1, (seq_len + seg - 1) // seg)
        dsk = Dskip[d0:d0 + w]
        p = np.empty(w, np.float32)
        ebits = np.empty(w, np.int32)
        e2 = ebits.view(np.float32)
        h = np.zeros((ns, w), np.float32)
        h_start = np.zeros((n_seg, ns, w), np.float32)
        # Pass 1: the state at the start of every segment.
        for t in range(seq_len):
            if t % seg == 0:
                h_start[t // seg] = h
            ut = u[bi, t, d0:d0 + w]
            dtt = dt[bi, t, d0:d0 + w]
            for n in range(ns):
                bn = B[bi, t, n]
                hn = h[n]
                _decay(dtt, A2[n, d0:d0 + w], p, ebits)
                for j in range(w):
                    hn[j] = p[j] * e2[j] * hn[j] + bn * dtt[j] * ut[j]
        # Pass 2: replay segments last to first; within one, recompute forward, then go back.
        h_seg = np.empty((seg, ns, w), np.float32)
        a_seg = np.empty((seg, ns, w), np.float32)
        carry = np.zeros((ns, w), np.float32)  # exp(dt_{t+1} A) * dL/dh_{t+1}
        gA_loc = np.zeros((ns, w), np.float32)
        gD_loc = np.zeros(w, np.float32)
        gu_acc = np.empty(w, np.float32)
        gdt_acc = np.empty(w, np.float32)
        for s in range(n_seg - 1, -1, -1):
            t0 = s * seg
            t1 = min(seq_len, t0 + seg)
            h[:] = h_start[s]
            for kk in range(t1 - t0):
                t = t0 + kk
                ut = u[bi, t, d0:d0 + w]
                dtt = dt[bi, t, d0:d0 + w]
                for n in range(ns):
                    bn = B[bi, t, n]
                    _decay(dtt, A2[n, d0:d0 + w], p, ebits)
                    for j in range(w):
                        a = p[j] * e2[j]
                        a_seg[kk, n, j] = a
                        h[n, j] = a * h[n, j] + bn * dtt[j] * ut[j]
                        h_seg[kk, n, j] = h[n, j]
            for kk in range(t1 - t0 - 1, -1, -1):
                t = t0 + kk
                ut = u[bi, t, d0:d0 + w]
                gyt = gy[bi, t, d0:d0 + w]
                dtt = dt[bi, t, d0:d0 + w]
                for j in range(w):
                    gu_acc[j] = dsk[j] * gyt[j]
                    gD_loc[j] += gyt[j] * ut[j]
                    gdt_acc[j] = 0.0
                for n in range(ns):
                    cn = C[bi, t, n]
                    bn = B[bi, t, n]
                    an = A[n, d0:d0 + w]
                    h_prev = h_seg[kk - 1, n] if kk > 0 else h_start[s, n]
                    h_cur = h_seg[kk, n]
                    a_cur = a_seg[kk, n]
                    g_c = np.float32(0.0)
                    g_b = np.float32(0.0)
                    for j in range(w):
                        gh = cn * gyt[j] + carry[n, j]
                        g_c += gyt[j] * h_cur[j]
                        gu_acc[j] += gh * dtt[j] * bn
                        ha = h_prev[j] * a_cur[j]
                        gdt_acc[j] += gh * (bn * ut[j] + ha * an[j])
                        gA_loc[n, j] += gh * ha * dtt[j]
                        g_b += gh * dtt[j] * ut[j]
                        carry[n, j] = a_cur[j] * gh
                    gB_part[bi, chunk, t, n] = g_b
                    gC_part[bi, chunk, t, n] = g_c
                gu[bi, t, d0:d0 + w] = gu_acc
                gdt[bi, t, d0:d0 + w] = gdt_acc
        for t in range(seq_len, nl):
            gu[bi, t, d0:d0 + w] = 0.0
            gdt[bi, t, d0:d0 + w] = 0.0
        for n in range(ns):
            gA_part[bi, n, d0:d0 + w] = gA_loc[n]
        gD_part[bi, d0:d0 + w] = gD_loc


@nb.njit(parallel=True, fastmath=True, cache=True)
def _step_sizes(delta, bias, lengths, dt, rows):
    nb_, nl, nd = delta.shape
    n_blocks = (nl + rows - 1) // rows
    for task in prange(nb_ * n_blocks):
        bi, t0 = task // n_blocks, (task % n_blocks) * rows
        p = np.empty(nd, np.float32)
        ebits = np.empty(nd, np.int32)
        for t in range(t0, min(nl, t0 + rows)):
            row = dt[bi, t]
            if t >= lengths[bi]:
                row[:] = 0.0
                continue
            for j in range(nd):
                row[j] = delta[bi, t, j] + bias[j]
            softplus_inplace(row, p, ebits)


def step_sizes(delta, delta_bias=None, lengths=None) -> torch.Tensor:
    """dt = softplus(delta + delta_bias), zero on padding, (b, l, D) float32, in one pass (no gradient)."""
    b, l, d = delta.shape
    dt = torch.empty(b, l, d, dtype=torch.float32)
    bias = np.zeros(d, np.float32) if delta_bias is None else f32(delta_bias)
    _step_sizes(f32_rows(delta), bias, _lengths(lengths, b, l), dt.numpy(), 64)
    return dt


def _lengths(lengths, b: int, l: int) -> np.ndarray:
    if lengths is None:
        return np.full(b, l, np.int64)
    return lengths.detach().to(torch.int64).cpu().clamp(0, l).numpy()  # the kernels never index past l


def scan_forward(u, dt, A, B, C, D_skip=None, lengths=None, delta_bias=None, dt_softplus=False, z=None):
    """y (b, l, D) float32 and the last state (b, D, N) float32.

    dt is the positive step size, or, with `dt_softplus`, the pre-activation delta; `delta_bias` (D,) is added
    first. With z (b, l, D) the output is gated: y * silu(z). Autograd's path (`ops.scan`) hands over dt alone;
    inference hands over delta, bias and z, so that softplus and the gate cost no passes of their own. z may
    be a strided view (the second half of in_proj's output): it is read in place, not copied.
    """
    b, l, d = u.shape
    y = torch.empty(b, l, d, dtype=torch.float32)
    last = torch.empty(b, d, A.shape[1], dtype=torch.float32)
    dsk = np.zeros(d, np.float32) if D_skip is None else f32(D_skip)
    bias = np.zeros(d, np.float32) if delta_bias is None else f32(delta_bias)
    gate = z is not None
    zs = f32_rows(z) if gate else np.zeros((1, 1, 1), np.float32)
    _scan_fwd(f32(u), f32(dt), bias, dt_softplus, zs, gate, f32(A.t() * float(LOG2E)), f32(B), f32(C), dsk,
              _lengths(lengths, b, l), y.numpy(), last.numpy(), channel_chunks(b, d))
    return y, last


def scan_backward(gy, u, dt, A, B, C, D_skip=None, lengths=None):
    """Gradients of sum(gy * y) with respect to u, dt, A, B, C, D_skip (float32; None for an absent D_skip)."""
    b, l, d = u.shape
    n = A.shape[1]
    width = channel_chunks(b, d)
    n_chunks = -(-d // width)
    gu, gdt = torch.empty(b, l, d), torch.empty(b, l, d)
    gA_part, gD_part = torch.empty(b, n, d), torch.empty(b, d)
    gB_part, gC_part = torch.zeros(b, n_chunks, l, n), torch.zeros(b, n_chunks, l, n)
    dsk = np.zeros(d, np.float32) if D_skip is None else f32(D_skip)
    _scan_bwd(f32(u), f32(dt), f32(A.t() * float(LOG2E)), f32(A.t()), f32(B), f32(C), dsk,
              _lengths(lengths, b, l), f32(gy), gu.numpy(), gdt.numpy(), gA_part.numpy(), gD_part.numpy(),
              gB_part.numpy(), gC_part.numpy(), width, SEGMENT)
    return gu, gdt, gA_part.sum(0).t(), gB_part.sum(1), gC_part.sum(1), None if D_skip is None else gD_part.sum(0)
