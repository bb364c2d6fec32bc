"""Selective scan in Triton, forward and backward, beside its PyTorch reference.

The core recurrence only (the caller applies softplus, padding masks and the output gate):

    h_t = exp(dt_t A) * h_{t-1} + dt_t * B_t * u_t        h: (D, N) per sequence
    y_t = C_t . h_t + D_skip * u_t

Shapes, token-major: u, dt, y (b, l, D); A (D, N); B, C (b, l, N); D_skip (D,); lengths (b,) int.
Positions t >= lengths[i] are padding: not scanned, y = 0 there, and `last` is the state after the
last real token.

One program per (sequence, block of BLOCK_D channels) walks time with its (BLOCK_D, N) state in
registers. The backward does not store (b, l, D, N) states: the forward keeps the state at the start
of every SEG-step segment, and the backward replays one segment at a time into a small scratch
buffer, then walks it in reverse. B and C are shared by all channels, so their gradients are written
per channel block and summed afterwards (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SEG = 32


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, len_ptr, y_ptr, last_ptr, ckpt_ptr,
    L, D, N, n_seg,
    HAS_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SEG: tl.constexpr,
    STORE_CKPT: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * L * D passes 2**31 at large batches
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dmask = d < D
    nmask = n < N
    dn_mask = dmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=dn_mask, other=0.0)
    Dskip = tl.load(Dskip_ptr + d, mask=dmask, other=0.0) if HAS_D else tl.zeros([BLOCK_D], tl.float32)
    length = tl.load(len_ptr + pid_b)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    row = pid_b * L * D
    rowN = pid_b * L * N
    ckpt_base = ckpt_ptr + pid_b * n_seg * D * N + d[:, None] * N + n[None, :]
    for t in range(0, length):
        if STORE_CKPT:  # only the backward reads them: inference skips the (b, l / SEG, D, N) buffer
            if t % SEG == 0:
                tl.store(ckpt_base + (t // SEG) * D * N, h, mask=dn_mask)
        dt = tl.load(dt_ptr + row + t * D + d, mask=dmask, other=0.0)
        u = tl.load(u_ptr + row + t * D + d, mask=dmask, other=0.0)
        Bt = tl.load(B_ptr + rowN + t * N + n, mask=nmask, other=0.0)
        Ct = tl.load(C_ptr + rowN + t * N + n, mask=nmask, other=0.0)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1) + Dskip * u
        tl.store(y_ptr + row + t * D + d, y, mask=dmask)
    tl.store(last_ptr + pid_b * D * N + d[:, None] * N + n[None, :], h, mask=dn_mask)


@triton.jit
def _scan_bwd_kernel(
    gy_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, Dskip_ptr, len_ptr, ckpt_ptr, scratch_ptr,
    gu_ptr, gdt_ptr, gA_ptr, gD_ptr, gB_ptr, gC_ptr,
    L, D, N, n_seg, n_blk,
    HAS_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SEG: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * L * D passes 2**31 at large batches
    pid_d = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dmask = d < D
    nmask = n < N
    dn_mask = dmask[:, None] & nmask[None, :]
    dn = d[:, None] * N + n[None, :]
    A = tl.load(A_ptr + dn, mask=dn_mask, other=0.0)
    Dskip = tl.load(Dskip_ptr + d, mask=dmask, other=0.0) if HAS_D else tl.zeros([BLOCK_D], tl.float32)
    length = tl.load(len_ptr + pid_b)
    row = pid_b * L * D
    rowN = pid_b * L * N
    part = (pid_b * n_blk + pid_d) * L * N  # this program's slice of the per-block gB / gC partials
    scratch = scratch_ptr + (pid_b * n_blk + pid_d) * SEG * BLOCK_D * BLOCK_N \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    gh_next = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # exp(dt_{t+1} A) * dL/dh_{t+1}
    gA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    gD = tl.zeros([BLOCK_D], dtype=tl.float32)
    segs = tl.cdiv(length, SEG)
    for k in range(0, segs):
        s = segs - 1 - k
        start = s * SEG
        stop = tl.minimum(start + SEG, length)
        h0 = tl.load(ckpt_ptr + pid_b * n_seg * D * N + s * D * N + dn, mask=dn_mask, other=0.0)
        h = h0
        for t in range(start, stop):  # replay the segment's states into scratch
            dt = tl.load(dt_ptr + row + t * D + d, mask=dmask, other=0.0)
            u = tl.load(u_ptr + row + t * D + d, mask=dmask, other=0.0)
            Bt = tl.load(B_ptr + rowN + t * N + n, mask=nmask, other=0.0)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (t - start) * BLOCK_D * BLOCK_N, h)
        tl.debug_barrier()
        for i in range(0, stop - start):
            t = stop - 1 - i
            dt = tl.load(dt_ptr + row + t * D + d, mask=dmask, other=0.0)
            u = tl.load(u_ptr + row + t * D + d, mask=dmask, other=0.0)
            gy = tl.load(gy_ptr + row + t * D + d, mask=dmask, other=0.0)
            Bt = tl.load(B_ptr + rowN + t * N + n, mask=nmask, other=0.0)
            Ct = tl.load(C_ptr + rowN + t * N + n, mask=nmask, other=0.0)
            h_t = tl.load(scratch + (t - start) * BLOCK_D * BLOCK_N)
            h_prev = tl.load(scratch + tl.maximum(t - start - 1, 0) * BLOCK_D * BLOCK_N)
            h_prev = tl.where(t == start, h0, h_prev)
            dA = tl.exp(dt[:, None] * A)
            gh = gy[:, None] * Ct[None, :] + gh_next
            gh = tl.where(dn_mask, gh, 0.0)
            gu = tl.sum(gh * Bt[None, :], axis=1) * dt + gy * Dskip
            gdt = tl.sum(gh * (A * dA * h_prev + u[:, None] * Bt[None, :]), axis=1)
            tl.store(gu_ptr + row + t * D + d, gu, mask=dmask)
            tl.store(gdt_ptr + row + t * D + d, gdt, mask=dmask)
            tl.store(gB_ptr + part + t * N + n, tl.sum(gh * (dt * u)[:, None], axis=0), mask=nmask)
            tl.store(gC_ptr + part + t * N + n, tl.sum(gy[:, None] * h_t, axis=0), mask=nmask)
            gA += gh * dt[:, None] * dA * h_prev
            gD += gy * u
            gh_next = dA * gh
        tl.debug_barrier()
    tl.store(gA_ptr + pid_b * D * N + dn, gA, mask=dn_mask)
    tl.store(gD_ptr + pid_b * D + d, gD, mask=dmask)


def _prepare(u, dt, A, B, C, D_skip, lengths):
    b, l, D = u.shape
    f = lambda x: x.float().contiguous()
    if lengths is None:
        lengths = torch.full((b,), l, dtype=torch.int32, device=u.device)
    Dk = f(D_skip) if D_skip is not None else torch.zeros(1, device=u.device)
    return f(u), f(dt), f(A), f(B), f(C), Dk, lengths.to(device=u.device, dtype=torch.int32).contiguous()


def _blocks(D: int, N: int) -> tuple[int, int]:
    return min(64, triton.next_power_of_2(D)), triton.next_power_of_2(N)


def selective_scan_fwd(u, dt, A, B, C, D_skip=None, lengths=None, return_checkpoints=False):
    """(y (b, l, D) float32, last (b, D, N) float32[, checkpoints (b, n_seg, D, N)])."""
    b, l, D = u.shape
    N = A.shape[1]
    u, dt, A, B, C, Dk, lengths = _prepare(u, dt, A, B, C, D_skip, lengths)
    BLOCK_D, BLOCK_N = _blocks(D, N)
    n_seg = max(1, triton.cdiv(l, SEG))
    y = torch.zeros(b, l, D, device=u.device)
    last = torch.empty(b, D, N, device=u.device)
    ckpt = torch.empty(b, n_seg, D, N, device=u.device) if return_checkpoints else torch.empty(1, device=u.device)
    grid = (b, triton.cdiv(D, BLOCK_D))
    _scan_fwd_kernel[grid](u, dt, A, B, C, Dk, lengths, y, last, ckpt, l, D, N, n_seg,
                           HAS_D=D_skip is not None, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, SEG=SEG,
                           STORE_CKPT=return_checkpoints)
    return (y, last, ckpt) if return_checkpoints else (y, last)


def selective_scan_bwd(gy, u, dt, A, B, C, D_skip=None, lengths=None, checkpoints=None):
    """Gradients (gu, gdt, gA, gB, gC, gD) of sum(gy * y); gD is None without D_skip."""
    b, l, D = u.shape
    N = A.shape[1]
    if checkpoints is None:
        _, _, checkpoints = selective_scan_fwd(u, dt, A, B, C, D_skip, lengths, return_checkpoints=True)
    has_d = D_skip is not None
    u, dt, A, B, C, Dk, lengths = _prepare(u, dt, A, B, C, D_skip, lengths)
    gy = gy.float().contiguous()
    BLOCK_D, BLOCK_N = _blocks(D, N)
    n_blk = triton.cdiv(D, BLOCK_D)
    n_seg = checkpoints.shape[1]
    dev = u.device
    gu, gdt = torch.zeros(b, l, D, device=dev), torch.zeros(b, l, D, device=dev)
    gA, gD = torch.zeros(b, D, N, device=dev), torch.zeros(b, D, device=dev)
    gB, gC = torch.zeros(b, n_blk, l, N, device=dev), torch.zeros(b, n_blk, l, N, device=dev)
    scratch = torch.empty(b, n_blk, SEG, BLOCK_D, BLOCK_N, device=dev)
    _scan_bwd_kernel[(b, n_blk)](
        gy, u, dt, A, B, C, Dk, lengths, checkpoints, scratch, gu, gdt, gA, gD, gB, gC,
        l, D, N, n_seg, n_blk, HAS_D=has_d, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, SEG=SEG,
    )
    return gu, gdt, gA.sum(0), gB.sum(1), gC.sum(1), (gD.sum(0) if has_d else None)


def selective_scan_fwd_reference(u, dt, A, B, C, D_skip=None, lengths=None):
    """The same recurrence as a PyTorch loop: (y, last), differentiable by autograd."""
    b, l, D = u.shape
    u, dt, A, B, C = (x.float() for x in (u, dt, A, B, C))
    n_real = torch.full((b,), l, device=u.device) if lengths is None else lengths.to(u.device)
    h = u.new_zeros(b, D, A.shape[1])
    ys = []
    for t in range(l):
        real = (t < n_real).float()
        step_dt = dt[:, t] * real[:, None]
        h = torch.exp(step_dt[..., None] * A) * h + (step_dt * u[:, t])[..., None] * B[:, t, None, :]
        y = (h * C[:, t, None, :]).sum(-1)
        if D_skip is not None:
            y = y + D_skip.float() * u[:, t]
        ys.append(y * real[:, None])
    return torch.stack(ys, 1), h
