"""The residual add and RMSNorm of a block in one pass (numba), for inference on CPU in float32.

    residual' = hidden + residual          (hidden alone for the first block)
    normed    = weight * residual' / sqrt(mean(residual'^2) + eps)

PyTorch spends four passes over (b, l, d) on this, each writing a fresh tensor; here each row is read
once and both outputs are written once, rows in parallel. `models.mamba.Block` uses it when no gradient
is needed; training keeps the PyTorch ops, which autograd differentiates.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from numba import prange


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
