"""RMS norms in one pass (numba), for inference on CPU in float32.

    add_rms_norm     a block's residual add and norm (`models.mamba.Block`):
                         residual' = hidden + residual          (hidden alone for the first block)
                         normed    = weight * residual' / sqrt(mean(residual'^2) + eps)
    gated_rms_norm   Mamba-2's gated norm (`models.mamba2.GatedRMSNorm`): h = y * silu(z), then the same norm
                     over each of G equal groups of channels, then the weight

PyTorch spends four to seven passes over (b, l, d) on each, each writing a fresh tensor; here each row is
read once and the outputs are written once, rows in parallel. They run when no gradient is needed; training
keeps the PyTorch ops, which autograd differentiates.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba import prange

from simba_cli.ops.numba_math import f32_rows, silu_inplace


@nb.njit(parallel=True, fastmath=True, cache=True)
def _add_rms_norm(hidden, residual, has_residual, weight, eps, out_residual, out):
    rows, d = hidden.shape
    for r in prange(rows):
        # The sum of squares in float64: fastmath lets LLVM reorder the sum, and numba's cached build of this
        # kernel orders it differently from a fresh build (float32 results moved by an ulp); in float64 the
        # order no longer reaches the float32 scale.
        sq = 0.0
        for j in range(d):
            v = hidden[r, j] + residual[r, j] if has_residual else hidden[r, j]
            out_residual[r, j] = v
            sq += np.float64(v) * np.float64(v)
        scale = np.float32(1.0 / np.sqrt(sq / d + eps))
        for j in range(d):
            out[r, j] = weight[j] * (out_residual[r, j] * scale)


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(normed, residual'), both (b, l, d) float32, from hidden and residual (b, l, d) or None, weight (d,)."""
    d = hidden.shape[-1]
    h = hidden.detach().contiguous().reshape(-1, d)
    res = h if residual is None else residual.detach().contiguous().reshape(-1, d)
    out_residual, out = torch.empty_like(h), torch.empty_like(h)
    _add_rms_norm(h.numpy(), res.numpy(), residual is not None, weight.detach().contiguous().numpy(),
                  np.float32(eps), out_residual.numpy(), out.numpy())
    return out.view(hidden.shape), out_residual.view(hidden.shape)


@nb.njit(parallel=True, fastmath=True, cache=True)
def _gated_rms_norm(y, z, weight, groups, eps, out):
    rows, d = y.shape
    width = d // groups
    for r in prange(rows):
        h = out[r]
        h[:] = z[r]
        p = np.empty(d, np.float32)
        ebits = np.empty(d, np.int32)
        silu_inplace(h, p, ebits)
        for g in range(groups):
            # 1-d slices, not [r, j]: LLVM vectorises loops over contiguous rows only
            lo, hi = g * width, (g + 1) * width
            h_g, y_g, w_g = h[lo:hi], y[r, lo:hi], weight[lo:hi]
            sq = 0.0  # float64, as in _add_rms_norm: the same bits from a fresh and a cached build
            for j in range(width):
                v = h_g[j] * y_g[j]
                h_g[j] = v
                sq += np.float64(v) * np.float64(v)
            scale = np.float32(1.0 / np.sqrt(sq / width + eps))
            for j in range(width):
                h_g[j] = w_g[j] * (h_g[j] * scale)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """weight * norm(y * silu(z)), the RMS over each of `groups` equal slices of the channels: (..., d) float32
    from y and z (..., d) (z may be a slice of a wider projection: only its channels need be contiguous)."""
    d = y.shape[-1]
    rows_y, rows_z = f32_rows(y.reshape(-1, d)), f32_rows(z.reshape(-1, d))
    out = torch.empty(rows_y.shape, dtype=torch.float32)
    _gated_rms_norm(rows_y, rows_z, weight.detach().float().contiguous().numpy(), groups, np.float32(eps),
                    out.numpy())
    return out.view(y.shape)
