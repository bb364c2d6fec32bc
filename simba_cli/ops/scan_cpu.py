"""The compiled CPU selective scan (numba), forward and backward, float32.

Same contract as `scan_ref.selective_scan_ref` (see there for shapes and the recurrence). Work is split
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

from simba_cli.ops.numba_math import LOG2E, X_MAX, X_MIN, channel_chunks, exp2_bits, exp2_poly, sigmoid, softplus

SEGMENT = 32  # backward replay segment length (time steps)


@nb.njit(parallel=True, fastmath=True, cache=True)
def _scan_fwd(u, delta, A2, B, C, Dskip, z, bias, lengths, use_softplus, has_z, y, last_state, width):
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
        dts = np.empty(w, np.float32)
        dtu = np.empty(w, np.float32)
        dsk = Dskip[d0:d0 + w]
        bs = bias[d0:d0 + w]
        for t in range(seq_len):
            ut = u[bi, t, d0:d0 + w]
            dlt = delta[bi, t, d0:d0 + w]
            for j in range(w):
                x = dlt[j] + bs[j]
                if use_softplus:
                    x = softplus(x)
                dts[j] = x
                dtu[j] = x * ut[j]
                ys[j] = dsk[j] * ut[j]
            for n in range(ns):
                bn = B[bi, t, n]
                cn = C[bi, t, n]
                an = A2[n, d0:d0 + w]
                hn = h[n]
                for j in range(w):
                    e = min(max(dts[j] * an[j], X_MIN), X_MAX)
                    k = np.floor(e)
                    p[j] = exp2_poly(e - k)
                    ebits[j] = exp2_bits(k)
                for j in range(w):
                    hv = p[j] * e2[j] * hn[j] + bn * dtu[j]
                    hn[j] = hv
                    ys[j] += cn * hv
            if has_z:
                zt = z[bi, t, d0:d0 + w]
                for j in range(w):
                    ys[j] *= zt[j] * sigmoid(zt[j])
            y[bi, t, d0:d0 + w] = ys
        for t in range(seq_len, nl):
            y[bi, t, d0:d0 + w] = 0.0
        for j in range(w):
            for n in range(ns):
                last_state[bi, d0 + j, n] = h[n, j]


@nb.njit(parallel=True, fastmath=True, cache=True)
def _scan_bwd(u, delta, A2, A, B, C, Dskip, z, bias, lengths, use_softplus, has_z, gy,
              gu, gdelta, gz, gA_part, gD_part, gbias_part, gB_part, gC_part, width, seg):
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
        bs = bias[d0:d0 + w]
        p = np.empty(w, np.float32)
        ebits = np.empty(w, np.int32)
        e2 = ebits.view(np.float32)
        dts = np.empty(w, np.float32)
        h = np.zeros((ns, w), np.float32)
        h_start = np.zeros((n_seg, ns, w), np.float32)
        # Pass 1: the state at the start of every segment.
        for t in range(seq_len):
            if t % seg == 0:
                h_start[t // seg] = h
            ut = u[bi, t, d0:d0 + w]
            dlt = delta[bi, t, d0:d0 + w]
            for j in range(w):
                x = dlt[j] + bs[j]
                if use_softplus:
                    x = softplus(x)
                dts[j] = x
            for n in range(ns):
                bn = B[bi, t, n]
                an = A2[n, d0:d0 + w]
                hn = h[n]
                for j in range(w):
                    e = min(max(dts[j] * an[j], X_MIN), X_MAX)
                    k = np.floor(e)
                    p[j] = exp2_poly(e - k)
                    ebits[j] = exp2_bits(k)
                for j in range(w):
                    hn[j] = p[j] * e2[j] * hn[j] + bn * dts[j] * ut[j]
        # Pass 2: replay segments last to first.
        h_seg = np.empty((seg, ns, w), np.float32)
        a_seg = np.empty((seg, ns, w), np.float32)
        dt_seg = np.empty((seg, w), np.float32)
        carry = np.zeros((ns, w), np.float32)  # exp(dt_{t+1} A) * dL/dh_{t+1}
        gA_loc = np.zeros((ns, w), np.float32)
        gD_loc = np.zeros(w, np.float32)
        gb_loc = np.zeros(w, np.float32)
        gys = np.empty(w, np.float32)
        gu_acc = np.empty(w, np.float32)
        gdt_acc = np.empty(w, np.float32)
        for s in range(n_seg - 1, -1, -1):
            t0 = s * seg
            t1 = min(seq_len, t0 + seg)
            h[:] = h_start[s]
            for kk in range(t1 - t0):
                t = t0 + kk
                ut = u[bi, t, d0:d0 + w]
                dlt = delta[bi, t, d0:d0 + w]
                for j in range(w):
                    x = dlt[j] + bs[j]
                    if use_softplus:
                        x = softplus(x)
                    dt_seg[kk, j] = x
                for n in range(ns):
                    bn = B[bi, t, n]
                    an = A2[n, d0:d0 + w]
                    for j in range(w):
                        e = min(max(dt_seg[kk, j] * an[j], X_MIN), X_MAX)
                        k = np.floor(e)
                        p[j] = exp2_poly(e - k)
                        ebits[j] = exp2_bits(k)
                    for j in range(w):
                        a = p[j] * e2[j]
                        a_seg[kk, n, j] = a
                        h[n, j] = a * h[n, j] + bn * dt_seg[kk, j] * ut[j]
                        h_seg[kk, n, j] = h[n, j]
            for kk in range(t1 - t0 - 1, -1, -1):
                t = t0 + kk
                ut = u[bi, t, d0:d0 + w]
                gyt = gy[bi, t, d0:d0 + w]
                dtk = dt_seg[kk]
                if has_z:
                    zt = z[bi, t, d0:d0 + w]
                    for j in range(w):
                        y_ssm = dsk[j] * ut[j]
                        for n in range(ns):
                            y_ssm += C[bi, t, n] * h_seg[kk, n, j]
                        sg = sigmoid(zt[j])
                        gys[j] = gyt[j] * zt[j] * sg
                        gz[bi, t, d0 + j] = gyt[j] * y_ssm * sg * (np.float32(1.0) + zt[j] * (np.float32(1.0) - sg))
                else:
                    gys[:] = gyt
                for j in range(w):
                    gu_acc[j] = dsk[j] * gys[j]
                    gD_loc[j] += gys[j] * ut[j]
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
                        gh = cn * gys[j] + carry[n, j]
                        g_c += gys[j] * h_cur[j]
                        gu_acc[j] += gh * dtk[j] * bn
                        ha = h_prev[j] * a_cur[j]
                        gdt_acc[j] += gh * (bn * ut[j] + ha * an[j])
                        gA_loc[n, j] += gh * ha * dtk[j]
                        g_b += gh * dtk[j] * ut[j]
                        carry[n, j] = a_cur[j] * gh
                    gB_part[bi, chunk, t, n] = g_b
                    gC_part[bi, chunk, t, n] = g_c
                if use_softplus:
                    dlt = delta[bi, t, d0:d0 + w]
                    for j in range(w):
                        gdt_acc[j] *= sigmoid(dlt[j] + bs[j])
                for j in range(w):
                    gb_loc[j] += gdt_acc[j]
                    gu[bi, t, d0 + j] = gu_acc[j]
                    gdelta[bi, t, d0 + j] = gdt_acc[j]
        for t in range(seq_len, nl):
            for j in range(w):
                gu[bi, t, d0 + j] = 0.0
                gdelta[bi, t, d0 + j] = 0.0
                if has_z:
                    gz[bi, t, d0 + j] = 0.0
        for n in range(ns):
            for j in range(w):
                gA_part[bi, n, d0 + j] = gA_loc[n, j]
        for j in range(w):
            gD_part[bi, d0 + j] = gD_loc[j]
            gbias_part[bi, d0 + j] = gb_loc[j]


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def _inputs(u, delta, A, B, C, D_skip, z, delta_bias, lengths):
    b, l, d = u.shape
    zeros = np.zeros(d, np.float32)
    return dict(
        u=_f32(u), delta=_f32(delta),
        A=_f32(A.t()), A2=_f32(A.t() * float(LOG2E)),
        B=_f32(B), C=_f32(C),
        Dskip=zeros if D_skip is None else _f32(D_skip),
        z=np.zeros((1, 1, 1), np.float32) if z is None else _f32(z),
        bias=zeros if delta_bias is None else _f32(delta_bias),
        lengths=(np.full(b, l, np.int64) if lengths is None
                 else lengths.detach().to(torch.int64).cpu().numpy()),
    )


def scan_forward(u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=False, lengths=None):
    """Returns y (b, l, D) in u's dtype and the last state (b, D, N) in float32."""
    b, l, d = u.shape
    x = _inputs(u, delta, A, B, C, D_skip, z, delta_bias, lengths)
    y = torch.empty(b, l, d, dtype=torch.float32)
    last = torch.empty(b, d, A.shape[1], dtype=torch.float32)
    _scan_fwd(x["u"], x["delta"], x["A2"], x["B"], x["C"], x["Dskip"], x["z"], x["bias"], x["lengths"],
              bool(delta_softplus), z is not None, y.numpy(), last.numpy(), channel_chunks(b, d))
    return y.to(u.dtype), last


def scan_backward(gy, u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=False,
                  lengths=None):
    """Gradients of sum(gy * y) with respect to u, delta, A, B, C, D_skip, z, delta_bias (None where absent)."""
    b, l, d = u.shape
    n = A.shape[1]
    x = _inputs(u, delta, A, B, C, D_skip, z, delta_bias, lengths)
    width = channel_chunks(b, d)
    n_chunks = -(-d // width)
    gu, gdelta = torch.empty(b, l, d), torch.empty(b, l, d)
    gz = torch.empty(b, l, d) if z is not None else torch.empty(1, 1, 1)
    gA_part, gD_part, gbias_part = torch.empty(b, n, d), torch.empty(b, d), torch.empty(b, d)
    gB_part, gC_part = torch.zeros(b, n_chunks, l, n), torch.zeros(b, n_chunks, l, n)
    _scan_bwd(x["u"], x["delta"], x["A2"], x["A"], x["B"], x["C"], x["Dskip"], x["z"], x["bias"], x["lengths"],
              bool(delta_softplus), z is not None, _f32(gy),
              gu.numpy(), gdelta.numpy(), gz.numpy(), gA_part.numpy(), gD_part.numpy(), gbias_part.numpy(),
              gB_part.numpy(), gC_part.numpy(), width, SEGMENT)
    return (
        gu.to(u.dtype), gdelta.to(delta.dtype), gA_part.sum(0).t().to(A.dtype),
        gB_part.sum(1).to(B.dtype), gC_part.sum(1).to(C.dtype),
        None if D_skip is None else gD_part.sum(0).to(D_skip.dtype),
        None if z is None else gz.to(z.dtype),
        None if delta_bias is None else gbias_part.sum(0).to(delta_bias.dtype),
    )
