"""The Simba token score in Triton, fused, beside its PyTorch reference.

For each sequence with last real token T and every t <= T:

    dy_T(t)[d] = sum_n C_T[n] * exp(A[d, n] * S_t[d]) * dt_t[d] * B_t[n] * u_t[d],
    S_t = sum_{t < k <= T} dt_k                    (reverse exclusive cumulative sum, >= 0)
    score(t)   = max_d dy_T(t)[d]     (or max_d |dy_T(t)[d]| when `absolute`; times gate_T[d] first
                                       when a gate is given)

Shapes: u, dt (b, l, D) with dt > 0; A (D, N) < 0; B, C (b, l, N); last_idx (b,); gate_T (b, D).
Returns (b, l) float32 with -inf after T. The kernel never materialises the (b, l, D, N) tensor: one
program handles BLOCK_T tokens and walks the channels in blocks, keeping a running max.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _simba_score_kernel(
    u_ptr, dt_ptr, S_ptr, A_ptr, B_ptr, C_ptr, last_ptr, gate_ptr, out_ptr,
    L, D, N,
    ABSOLUTE: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * L * D passes 2**31 at large batches
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.arange(0, BLOCK_N)
    T = tl.load(last_ptr + pid_b)
    tmask = t <= T
    nmask = n < N
    rowN = pid_b * L * N
    cT = tl.load(C_ptr + rowN + T * N + n, mask=nmask, other=0.0)
    Bt = tl.load(B_ptr + rowN + t[:, None] * N + n[None, :], mask=tmask[:, None] & nmask[None, :], other=0.0)
    BC = Bt * cT[None, :]  # (BLOCK_T, BLOCK_N)
    best = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        td = pid_b * L * D + t[:, None] * D + d[None, :]
        tdmask = tmask[:, None] & dmask[None, :]
        S = tl.load(S_ptr + td, mask=tdmask, other=0.0)
        dtu = tl.load(dt_ptr + td, mask=tdmask, other=0.0) * tl.load(u_ptr + td, mask=tdmask, other=0.0)
        A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dmask[:, None] & nmask[None, :], other=0.0)
        decay = tl.exp(A[None, :, :] * S[:, :, None])  # (BLOCK_T, BLOCK_D, BLOCK_N)
        contrib = tl.sum(decay * BC[:, None, :], axis=2) * dtu
        if HAS_GATE:
            contrib = contrib * tl.load(gate_ptr + pid_b * D + d, mask=dmask, other=0.0)[None, :]
        if ABSOLUTE:
            contrib = tl.abs(contrib)
        contrib = tl.where(dmask[None, :], contrib, float("-inf"))
        best = tl.maximum(best, tl.max(contrib, axis=1))
    best = tl.where(tmask, best, float("-inf"))
    tl.store(out_ptr + pid_b * L + t, best, mask=t < L)


def _reverse_exclusive_cumsum(dt: torch.Tensor, last_idx: torch.Tensor) -> torch.Tensor:
    upto = torch.arange(dt.shape[1], device=dt.device)[None, :] <= last_idx[:, None]
    dtm = dt * upto[..., None]
    return dtm.flip(1).cumsum(1).flip(1) - dtm


def simba_score(u, dt, A, B, C, last_idx, absolute=False, gate_T=None) -> torch.Tensor:
    b, l, D = u.shape
    N = A.shape[1]
    f = lambda x: x.float().contiguous()
    u, dt, A, B, C = f(u), f(dt), f(A), f(B), f(C)
    S = _reverse_exclusive_cumsum(dt, last_idx).contiguous()
    last = last_idx.to(device=u.device, dtype=torch.int32).contiguous()
    gate = f(gate_T) if gate_T is not None else u  # not read without a gate
    out = torch.empty(b, l, device=u.device)
    BLOCK_T, BLOCK_D, BLOCK_N = 16, min(32, triton.next_power_of_2(D)), triton.next_power_of_2(N)
    _simba_score_kernel[(b, triton.cdiv(l, BLOCK_T))](
        u, dt, S, A, B, C, last, gate, out, l, D, N,
        ABSOLUTE=absolute, HAS_GATE=gate_T is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
    )
    return out


def simba_score_reference(u, dt, A, B, C, last_idx, absolute=False, gate_T=None) -> torch.Tensor:
    """The same score in plain PyTorch, materialising (b, l, D, N) (small inputs only)."""
    b, l, D = u.shape
    u, dt, A, B, C = (x.double() for x in (u, dt, A, B, C))
    S = _reverse_exclusive_cumsum(dt, last_idx)
    cT = C[torch.arange(b), last_idx]  # (b, N)
    decay = torch.exp(A[None, None] * S[..., None])  # (b, l, D, N)
    contrib = (decay * (B * cT[:, None, :])[:, :, None, :]).sum(-1) * dt * u
    if gate_T is not None:
        contrib = contrib * gate_T.double()[:, None, :]
    if absolute:
        contrib = contrib.abs()
    scores = contrib.amax(-1)
    after = torch.arange(l, device=u.device)[None, :] > last_idx[:, None]
    return scores.masked_fill(after, float("-inf")).float()
