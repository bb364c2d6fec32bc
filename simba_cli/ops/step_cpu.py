"""One Mamba-1 decode step's elementwise work in two numba calls (CPU, float32, no gradient).

A step at b=1 is a handful of matrix-vector products (in_proj, x_proj, dt_proj, out_proj) and, between
them, about twenty small PyTorch ops a layer, each costing more in dispatch than in arithmetic. Here
the ops between the products are two kernels, for x, z (b, D) from in_proj:

    conv_step   conv_state <- [conv_state[:, :, 1:], x];  u = silu(conv_state . weight + bias)      (b, D)
    ssm_step    dt = softplus(delta + dt_bias);  h <- exp(dt A) h + dt u B;  y = (h . C + D u) silu(z)

`models.mamba.MambaMixer.step` uses them; its PyTorch ops stay the reference (tests/test_ops.py).
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch

from simba_cli.ops.numba_math import LOG2E, X_MIN, exp2_bits, exp2_poly, f32, silu_inplace, softplus_inplace


@nb.njit(fastmath=True, cache=True)
def _conv_step(conv_state, x, weight, bias, u):
    nb_, nd, k = conv_state.shape
    p = np.empty(nd, np.float32)
    ebits = np.empty(nd, np.int32)
    for bi in range(nb_):
        for d in range(nd):
            acc = bias[d]
            for i in range(k - 1):
                v = conv_state[bi, d, i + 1]
                conv_state[bi, d, i] = v
                acc += v * weight[d, i]
            conv_state[bi, d, k - 1] = x[bi, d]
            u[bi, d] = acc + x[bi, d] * weight[d, k - 1]
        silu_inplace(u[bi], p, ebits)


@nb.njit(fastmath=True, cache=True)
def _ssm_step(state, u, delta, dt_bias, A2, B, C, Dskip, z, y):
    # A2 = A * log2(e), (D, N): exp(dt A) = 2^(dt A2), evaluated over the N states at once (vectorised).
    nb_, nd, ns = state.shape
    dt = np.empty(nd, np.float32)
    gate = np.empty(nd, np.float32)
    p = np.empty(max(nd, ns), np.float32)
    ebits = np.empty(max(nd, ns), np.int32)
    e2 = ebits.view(np.float32)
    for bi in range(nb_):
        for d in range(nd):
            dt[d] = delta[bi, d] + dt_bias[d]
            gate[d] = z[bi, d]
        softplus_inplace(dt, p, ebits)
        silu_inplace(gate, p, ebits)
        for d in range(nd):
            du = dt[d] * u[bi, d]
            for n in range(ns):
                e = max(dt[d] * A2[d, n], X_MIN)
                k = np.floor(e)
                p[n] = exp2_poly(e - k)
                ebits[n] = exp2_bits(k)
            acc = np.float32(0.0)
            for n in range(ns):
                h = p[n] * e2[n] * state[bi, d, n] + du * B[bi, n]
                state[bi, d, n] = h
                acc += h * C[bi, n]
            y[bi, d] = (acc + Dskip[d] * u[bi, d]) * gate[d]


def conv_step(conv_state: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """u (b, D) float32; conv_state (b, D, k) float32 contiguous, updated in place."""
    u = torch.empty(x.shape, dtype=torch.float32)
    bias_ = np.zeros(x.shape[-1], np.float32) if bias is None else f32(bias)
    _conv_step(conv_state.numpy(), f32(x), f32(weight), bias_, u.numpy())
    return u


def ssm_step(state, u, delta, dt_bias, A, B, C, D_skip, z):
    """y (b, D) float32, gated; state (b, D, N) float32 contiguous, updated in place."""
    y = torch.empty(u.shape, dtype=torch.float32)
    _ssm_step(state.numpy(), f32(u), f32(delta), f32(dt_bias), f32(A * float(LOG2E)), f32(B), f32(C), f32(D_skip),
              f32(z), y.numpy())
    return y
