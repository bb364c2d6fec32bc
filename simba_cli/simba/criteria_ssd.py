"""The Simba criterion for Mamba-2 (SSD) layers.

This is the paper's Simba score, the contribution of token t to the layer's output at the last token T
(the unrolled recurrence of `simba.criteria`, there written for Mamba-1), specialised to SSD, where each
head h has one scalar decay A_h and one step size dt_t[h] per token, and B, C are shared by the heads of
a group g(h) = h // (H / G). Unrolling S_T = sum_t exp(A_h (dt_{t+1} + ... + dt_T)) dt_t x_t B_t^T and
y_T = S_T C_T, token t contributes

    dy_T(t)[h, p] = (C_T[g(h)] . B_t[g(h)]) * exp(A_h * S_t[h]) * dt_t[h] * x_t[h, p],
    S_t[h]        = sum_{k=t+1..T} dt_k[h]

The decay is a scalar per head, so the inner product over N factors out and the cost is O(N) per group
and O(1) per channel, not O(N) per channel as for Mamba-1. The scan is linear in x, so dy_T(t) equals
y_T(full) - y_T(x_t = 0) for t < T; at t = T the skip D_h x_T adds to y_T too, which the score leaves out
(as `simba.criteria` does; the last token is never pruned).

Reductions over the D = H * P channels (h, p), as for Mamba-1:
    simba        max_{h,p} dy_T(t)[h, p]                       (signed)
    simba-abs    max_{h,p} |dy_T(t)[h, p]|
    simba-gated  max_{h,p} dy_T(t)[h, p] * silu(z_T)[h, p]     (including the output gate at T)

S_t is a reverse exclusive cumulative sum of non-negative step sizes, taken directly (a shifted running
sum, not a difference of two), so S_t >= 0 and, with A_h < 0, every exponent A_h S_t is <= 0: no
overflow, however long the sequence, large the steps or negative the decays. Parallel over t.

Shapes, for a batch of b right-padded sequences of length l:
    x (b, l, H, P)   dt (b, l, H) > 0   A (H,) < 0   B, C (b, l, G, N)   lengths (b,) real tokens
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from simba_cli.errors import UserError

SSD_VARIANTS = ("simba", "simba-abs", "simba-gated")


def _real_mask(lengths: torch.Tensor, l: int) -> torch.Tensor:
    """(b, l) True at positions t <= T = lengths - 1."""
    return torch.arange(l, device=lengths.device)[None, :] < lengths[:, None]


def ssd_contributions(x, dt, A, B, C, lengths) -> torch.Tensor:
    """dy_T(t)[h, p] for every token t of every sequence, (b, l, H, P).

    x (b, l, H, P), dt (b, l, H), A (H,), B and C (b, l, G, N), lengths (b,). T = lengths - 1 per sequence;
    positions past T (padding) are 0, whatever x and dt hold there. Computed in float32 at least.
    """
    b, l, H, P = x.shape
    G = B.shape[-2]
    if H % G:
        raise UserError(f"Simba (SSD): {H} heads do not split into {G} groups")
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    lengths = lengths.to(x.device)
    if l == 0:
        return x.new_zeros(b, 0, H, P)
    real = _real_mask(lengths, l)  # (b, l)
    dtm = torch.where(real[..., None], dt, torch.zeros((), dtype=dtype, device=dt.device))  # (b, l, H)
    # S_t = dt_{t+1} + ... + dt_T: the inclusive reverse running sum, shifted by one (0 at t >= T).
    incl = dtm.flip(1).cumsum(1).flip(1)  # (b, l, H): dt_t + ... + dt_T
    S = F.pad(incl[:, 1:], (0, 0, 0, 1))  # (b, l, H)
    decay = torch.exp(A * S)  # (b, l, H), in (0, 1]
    last = (lengths - 1).clamp(min=0)
    C_T = C[torch.arange(b, device=x.device), last]  # (b, G, N)
    cb = torch.einsum("bgn,blgn->blg", C_T, B).repeat_interleave(H // G, dim=-1)  # (b, l, H)
    out = (cb * decay * dtm)[..., None] * x  # (b, l, H, P)
    return torch.where(real[..., None, None], out, torch.zeros((), dtype=dtype, device=x.device))


def ssd_score(x, dt, A, B, C, lengths, variant: str = "simba", z_T=None) -> torch.Tensor:
    """The Simba score of an SSD layer's tokens, (b, l); padding gets -inf.

    Inputs as `ssd_contributions`; z_T (b, H * P) or (b, H, P) is the gate z at each sequence's last real
    token, needed by `simba-gated` only (silu is applied here).
    """
    if variant not in SSD_VARIANTS:
        raise UserError(f"unknown Simba variant {variant!r}; use one of {', '.join(SSD_VARIANTS)}")
    contrib = ssd_contributions(x, dt, A, B, C, lengths)  # (b, l, H, P)
    b, l, H, P = contrib.shape
    if variant == "simba-gated":
        if z_T is None:
            raise UserError("simba-gated needs the gate z at the last token (z_T)")
        if tuple(z_T.shape) not in ((b, H * P), (b, H, P)):
            raise UserError(f"simba-gated: z_T must be ({b}, {H * P}) or ({b}, {H}, {P}), got {tuple(z_T.shape)}")
        contrib = contrib * F.silu(z_T.to(contrib.dtype).reshape(b, 1, H, P))
    elif variant == "simba-abs":
        contrib = contrib.abs()
    scores = contrib.flatten(2).amax(-1) if H * P else contrib.new_zeros(b, l)
    return scores.masked_fill(~_real_mask(lengths.to(scores.device), l), float("-inf"))
