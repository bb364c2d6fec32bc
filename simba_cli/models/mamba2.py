"""A pure-PyTorch Mamba-2 (SSD) language model with Hugging Face `Mamba2ForCausalLM`'s architecture.

Glossary (code name -> paper symbol, shapes for a batch of b sequences of length l):
    d_model    d        width of the residual stream
    n_layer    n        number of blocks
    d_inner    D        channels of the SSM: expand * d = n_heads * head_dim
    n_heads    H        heads; each has one scalar decay A_h and one step size dt_h per token
    head_dim   P        channels per head: x is (b, l, H, P)
    n_groups   G        groups of heads sharing B and C (like grouped-query attention); H % G == 0
    d_state    N        state size: B, C are (b, l, G, N); head h reads group h // (H / G)
    d_conv     k        width of the causal depthwise convolution over xBC
    chunk_size Q        block length of the chunked (matmul) scan on GPUs (CPU_CHUNK_SIZE on CPU)
    A_log               A_h = -exp(A_log[h]) < 0, one scalar per head, (H,)
    dt_bias             dt = softplus(dt_raw + dt_bias), clamped to dt_limit, (b, l, H)
    D                   skip per head, y += D_h * x, (H,)

The SSD recurrence, per head h, with state S_t (P, N):
    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        y_t = S_t C_t + D_h x_t

Mixer, for hidden (b, l, d):
    z, xBC, dt_raw = in_proj(hidden).split(D, D + 2 G N, H)
    xBC    = silu(causal_conv1d(xBC))                   (b, l, D + 2 G N)
    x, B, C = xBC.split(D, G N, G N)
    y      = ssd(x, dt, A, B, C) + D x                  (b, l, H, P) -> (b, l, D)
    y      = norm(y * silu(z))                          RMS over each of G groups of D / G channels, then a weight
    out    = out_proj(y)

Blocks are Mamba-1's (`simba_cli.models.mamba.Block`): pre-norm with a separate residual stream,
    residual = hidden + residual;  hidden = mixer(norm(residual));  logits = lm_head(norm_f(hidden + residual))
and the mixer speaks the Mamba-1 mixer's interface (`mix(hidden, lengths, keep_scan_inputs=, final_state=)`
-> MixerOutput, and `step` for recurrent decoding), so the Simba core and decoding run either family.
The config lives in `models.mamba2_config` (importable from here too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from simba_cli.models.mamba import Block, BlockLM, MixerOutput, RMSNorm
from simba_cli.models.mamba2_config import Mamba2Config
from simba_cli.ops.conv import causal_conv1d, conv_state_at
from simba_cli.ops.linear import Linear
from simba_cli.ops.scan import scan_dt

# --- the SSD scan ----------------------------------------------------------------------------------
#   x (b, l, H, P); dt (b, l, H) positive; A (H,) negative; B, C (b, l, G, N); D (H,) or None.
#   Returns y (b, l, H, P), and the final state (b, H, P, N) when asked. Computed in float32 at least.


def _heads_by_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., H, X) -> (..., G, H / G, X): head h belongs to group h // (H / G)."""
    return t.unflatten(-2, (groups, t.shape[-2] // groups))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def ssd_scan_ref(x, dt, A, B, C, D=None, return_final_state: bool = False):
    """The reference: the recurrence over t, one token at a time."""
    b, l, H, P = x.shape
    G, N = B.shape[-2:]
    dtype = _compute_dtype(x)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    state = x.new_zeros(b, G, H // G, P, N)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b, H)
        inp = dt[:, t, :, None] * x[:, t]  # (b, H, P)
        state = _heads_by_group(decay[..., None], G)[..., None] * state \
            + _heads_by_group(inp, G)[..., None] * B[:, t, :, None, None, :]
        ys.append(torch.einsum("bgrpn,bgn->bgrp", state, C[:, t]).flatten(1, 2))
    y = torch.stack(ys, 1) if ys else x.new_zeros(b, 0, H, P)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x
    return (y, state.flatten(1, 2)) if return_final_state else y


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """seg[..., t, s] = a[s+1] + ... + a[t] for s <= t (0 on the diagonal), -inf above it; a (..., Q).

    Summed from the terms themselves, never as a difference of running sums: every finite entry is a sum
    of non-positive numbers, so exp(seg) never overflows and never rounds above 1."""
    q = a.shape[-1]
    k = torch.arange(q, device=a.device)
    # terms[..., k, s] = a[k] where k > s: a running sum over k then gives seg[..., t, s].
    terms = a[..., :, None].masked_fill(k[:, None] <= k[None, :], 0.0)
    seg = terms.cumsum(-2)
    return seg.masked_fill(k[:, None] < k[None, :], -math.inf)


# The block length of the chunked scan on CPU, whatever the checkpoint's chunk_size (a GPU kernel's tile): the
# result is the same for any Q (up to float rounding), and on CPU the within-chunk work, l Q (N + H P)
# multiply-adds and l Q H decays, costs more than the l / Q steps across chunks save. Measured side by side on a
# mamba2-130m layer, inference (medians of 15): at l = 1024, Q = 32 takes 10.5 ms, 48 12.0, 64 11.0, 96 14.4,
# 128 13.2; at l = 2048, 20.1, 29.7, 22.0, 31.0 and 27.5 ms. A zoo-m2 training step takes 0.56-0.68 s at Q = 32
# and 0.69-0.80 s at 48.
CPU_CHUNK_SIZE = 32
CHUNKS_AT_ONCE = 16  # chunks whose states the scan holds at once (b, 16, H, P, N): 12.6 MB for mamba2-130m
# Inference holds fewer: its states buffer is written and read four times per chunk (own state, the recurrence,
# the reads), and at 8 chunks (7 MB for mamba2-130m) it stays in cache. A mamba2-130m layer at l = 1024, medians
# of 21 side by side: 2 chunks 13.1 ms, 4 11.3, 8 11.7, 16 12.8, 32 13.3.
INFERENCE_CHUNKS_AT_ONCE = 8


# On GPUs the chunked scan runs as PyTorch ops that hold several (b, l / Q, H, Q, Q) tensors: at the checkpoints'
# Q = 256, 10.7 GB each for mamba2-2.7b at 16 x 8192 tokens. Blocks of at most this many keep them 4x smaller.
GPU_MAX_CHUNK_SIZE = 64


def scan_chunk_size(cfg: Mamba2Config, device: torch.device) -> int:
    """The block length the chunked scan uses on this device (the result does not depend on it): the config's, at
    most GPU_MAX_CHUNK_SIZE, on GPUs; CPU_CHUNK_SIZE elsewhere."""
    return min(cfg.chunk_size, GPU_MAX_CHUNK_SIZE) if device.type == "cuda" else CPU_CHUNK_SIZE


def _inference_on_cpu(*tensors) -> bool:
    """float32 on CPU and no gradient wanted: the scan's decays run in numba (`ops.ssd_cpu`), its states across
    chunks in place, and the gated norm in one pass (`ops.norm_cpu`); otherwise PyTorch's ops, for autograd."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def ssd_scan_chunked(x, dt, A, B, C, D=None, chunk_size: int = 256, return_final_state: bool = False):
    """The matmul form: within each chunk of Q tokens a masked (Q, Q) product, across chunks the recurrence.

    The sequence is padded with dt = 0 to a multiple of Q: a padded step neither decays nor adds to the state.
    Inference on CPU in float32 (no gradient wanted) computes the within-chunk part in numba
    (`ops.ssd_cpu`) and carries the states across chunks in one reused buffer; otherwise PyTorch's ops, which
    autograd differentiates.
    """
    b, l, H, P = x.shape
    G, N = B.shape[-2:]
    R = H // G
    dtype = _compute_dtype(x)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    inference = _inference_on_cpu(x, dt, A, B, C)
    Q = chunk_size
    pad = (-l) % Q
    padded = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t for t in (x, dt, B, C))
    xc, dtc, Bc, Cc = (t.unflatten(1, (-1, Q)) for t in padded)
    # xc (b, c, Q, H, P); dtc (b, c, Q, H); Bc, Cc (b, c, Q, G, N)
    dt_hq = dtc.transpose(-1, -2)  # (b, c, H, Q)
    a = dt_hq * A[:, None]  # (b, c, H, Q), non-positive
    scores = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)  # (b, c, G, Q, Q): C_t . B_s
    # 1. Within a chunk: y[t] = sum_{s <= t} (C_t . B_s) exp(seg[t, s]) dt_s x_s, and u_s = exp(seg[Q-1, s]) dt_s x_s,
    # x_s decayed to the chunk's end; w_out (b, c, H, Q): the decay from the chunk's start (before token 0) to t
    if inference:
        from simba_cli.ops.ssd_cpu import within_chunks  # one numba pass for PyTorch's dozen below

        y, u_in, w_out = within_chunks(a, dt_hq, scores, xc.flatten(1, 2), D, R)  # y with the D skip
        y, u_in = (t.unflatten(1, (-1, Q)).unflatten(3, (G, R)) for t in (y, u_in))  # (b, c, Q, G, R, P)
        w_out = _heads_by_group(w_out, G)  # (b, c, G, R, Q)
    else:
        seg = _segment_sums(a)  # (b, c, H, Q, Q)
        # weights (b, c, H, Q, Q): exp(seg[t, s]) scores[t, s] dt_s (0 above the diagonal); w_in (b, c, H, Q):
        # exp(seg[Q-1, s]) dt_s, from s to the chunk's end
        weights = (torch.exp(seg).unflatten(2, (G, R)) * scores[:, :, :, None]).flatten(2, 3) * dt_hq[..., None, :]
        w_in, w_out = torch.exp(seg[..., -1, :]) * dt_hq, torch.exp(a.cumsum(-1))
        x_g = _heads_by_group(xc, G)  # (b, c, Q, G, R, P)
        y = torch.einsum("bcgrts,bcsgrp->bctgrp", weights.unflatten(2, (G, R)), x_g)
        w_in, w_out = _heads_by_group(w_in, G), _heads_by_group(w_out, G)  # (b, c, G, R, Q)
        u_in = x_g * w_in.permute(0, 1, 4, 2, 3)[..., None]  # (b, c, Q, G, R, P)

    # 2. Across chunks: each chunk's own contribution to the state at its end (B^T u, from a zero state at its
    # start); the recurrence over chunks gives the state entering each; that state, decayed to each t within
    # the chunk, is read out. CHUNKS_AT_ONCE chunks at a time: a few large products instead of many small
    # ones, while memory holds that many states (b, H, P, N), not l / Q of them.
    chunk_decay = w_out[..., -1, None, None]  # (b, c, G, R, 1, 1): across the whole chunk
    state = x.new_zeros(b, G, R, P, N)
    across = _across_chunks_in_place if inference else _across_chunks
    state = across(y, Cc, w_out, u_in, Bc, chunk_decay, state) if xc.shape[1] else state

    y = y.flatten(3, 4).flatten(1, 2)[:, :l]  # (b, l, H, P)
    if D is not None and not inference:
        y = y.addcmul_(x, D.to(dtype)[:, None])
    return (y, state.flatten(1, 2)) if return_final_state else y


def _across_chunks(y, Cc, w_out, u_in, Bc, chunk_decay, state):
    """Adds the reads of the states entering each chunk, decayed to each t (w_out), into y (b, c, Q, G, R, P), and
    returns the final state. This is autograd's version: split and unbind, not [:, c], so that autograd joins the
    pieces' gradients once, not one full-size tensor each; the reads go into y's slices in place (a
    concatenated copy would cost as much again)."""
    pieces = (t.split(CHUNKS_AT_ONCE, 1) for t in (Cc, w_out, u_in, Bc, chunk_decay))
    for k, (C_k, w_k, u_k, B_k, decay_k) in enumerate(zip(*pieces)):
        entering = []
        for own, decay in zip(torch.einsum("bcsgrp,bcsgn->bcgrpn", u_k, B_k).unbind(1), decay_k.unbind(1)):
            entering.append(state)
            state = torch.addcmul(own, decay, state)
        reads = torch.einsum("bctgn,bcgrpn->bctgrp", C_k, torch.stack(entering, 1))
        y.narrow(1, k * CHUNKS_AT_ONCE, C_k.shape[1]).addcmul_(reads, w_k.permute(0, 1, 4, 2, 3)[..., None])
    return state


def _across_chunks_in_place(y, Cc, w_out, u_in, Bc, chunk_decay, state):
    """`_across_chunks` without gradients. The states are held as (N, R P) matrices, so that a chunk's own state
    (B^T u, (N, Q) @ (Q, R P)) and its reads (C h, (Q, N) @ (N, R P)) are plain batched products with no copy to
    reorder them; each state is written once, into a buffer of INFERENCE_CHUNKS_AT_ONCE + 1 that every group of
    chunks reuses (no list to stack, no fresh state per chunk: large fresh tensors cost page faults on CPU)."""
    b, c, _, G, R, P = u_in.shape
    N = Bc.shape[-1]
    k = min(INFERENCE_CHUNKS_AT_ONCE, c)
    states = state.new_empty(k + 1, b, G, N, R * P)
    state = state.permute(0, 1, 4, 2, 3).flatten(-2)  # (b, G, N, R P)
    decays = chunk_decay[..., 0].transpose(0, 1)[:, :, :, None]  # (c, b, G, 1, R, 1)
    states[0] = state
    by_head = states.unflatten(-1, (R, P))
    for start in range(0, c, k):
        n = min(k, c - start)
        B_k = Bc[:, start:start + n].permute(1, 0, 3, 4, 2)  # (n, b, G, N, Q)
        u_k = u_in[:, start:start + n].permute(1, 0, 3, 2, 4, 5).flatten(-2)  # (n, b, G, Q, R P)
        torch.matmul(B_k, u_k, out=states[1:n + 1])  # each chunk's own state, from a zero state at its start
        for i in range(n):  # the state leaving chunk i: its own plus the one entering it, decayed across it
            by_head[i + 1].addcmul_(by_head[i], decays[start + i])
        reads = torch.matmul(Cc[:, start:start + n].permute(1, 0, 3, 2, 4), states[:n])  # (n, b, G, Q, R P)
        reads = reads.unflatten(-1, (R, P)).permute(1, 0, 3, 2, 4, 5)  # (b, n, Q, G, R, P)
        y[:, start:start + n].addcmul_(reads, w_out[:, start:start + n].permute(0, 1, 4, 2, 3)[..., None])
        states[0] = states[n]
    return states[0].unflatten(-1, (R, P)).permute(0, 1, 3, 4, 2).contiguous()  # (b, G, R, P, N)


# --- the model -------------------------------------------------------------------------------------


class GatedRMSNorm(nn.Module):
    """norm(y * silu(z)): RMS over each of `groups` equal slices of the channels, then one weight per channel."""

    def __init__(self, d: int, groups: int, eps: float):
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y, z):
        if y[..., 0].numel() >= 64 and _inference_on_cpu(y, z, self.weight):
            from simba_cli.ops.norm_cpu import gated_rms_norm  # one numba pass; a decode step's row stays here

            return gated_rms_norm(y, z, self.weight, self.groups, self.eps)
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        h = h.unflatten(-1, (self.groups, -1))
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * h.to(dtype)


@dataclass
class SSDScanInputs:
    """What an SSD layer's scan consumed, for the Simba criterion (`simba.criteria_ssd`):

        x (b, l, H, P)   dt (b, l, H) positive, zero on padding   A (H,) negative   B, C (b, l, G, N)   z (b, l, D)

    dt is the scan's own step size, softplus(dt_raw + dt_bias) clamped to dt_limit; the gate z is kept for
    `simba-gated`."""

    x: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    z: torch.Tensor


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        self.in_proj = Linear(cfg.d_model, cfg.d_inner + cfg.conv_dim + cfg.n_heads, bias=cfg.bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(cfg.n_heads))
        self.A_log = nn.Parameter(torch.zeros(cfg.n_heads))
        self.D = nn.Parameter(torch.ones(cfg.n_heads))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.n_groups, cfg.norm_eps)
        self.out_proj = Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)

    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def forward(self, hidden, lengths=None):
        return self.mix(hidden, lengths).out

    def split_projection(self, hidden):
        """z (..., D), xBC (..., D + 2 G N) before the conv, dt_raw (..., H) from in_proj."""
        cfg = self.cfg
        return self.in_proj(hidden).split([cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1)

    def split_xbc(self, xbc):
        """The conv's output (..., D + 2 G N) as x (..., H, P), B and C (..., G, N)."""
        cfg = self.cfg
        x, B, C = xbc.split([cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_groups * cfg.d_state], dim=-1)
        groups = (cfg.n_groups, cfg.d_state)
        return x.unflatten(-1, (cfg.n_heads, cfg.head_dim)), B.unflatten(-1, groups), C.unflatten(-1, groups)

    def step_sizes(self, dt_raw, lengths=None):
        """dt = softplus(dt_raw + dt_bias) clamped to dt_limit, (..., H), float32 (float64 stays float64); zero on
        padding (positions past `lengths`), so that a padded step neither decays nor feeds the state."""
        dt = scan_dt(dt_raw, self.dt_bias).clamp(*self.cfg.dt_limit)
        if lengths is None:
            return dt
        real = torch.arange(dt.shape[1], device=dt.device)[None, :] < lengths.to(dt.device)[:, None]
        return dt * real[..., None]

    def mix(self, hidden, lengths=None, *, keep_scan_inputs: bool = False, final_state: bool = False) -> MixerOutput:
        """hidden (b, l, d), right-padded to `lengths` (b,) -> MixerOutput: out (b, l, d); with keep_scan_inputs
        the SSDScanInputs; with final_state the conv state (b, D + 2 G N, d_conv) and the SSM state (b, H, P, N)
        after each sequence's last real token. Padding never reaches real tokens: conv and scan are causal."""
        cfg = self.cfg
        b, l, _ = hidden.shape
        z, xbc_in, dt_raw = self.split_projection(hidden)
        xbc = causal_conv1d(xbc_in, self.conv1d.weight.squeeze(1), self.conv1d.bias, silu=True)
        x, B, C = self.split_xbc(xbc)
        dt = self.step_sizes(dt_raw, lengths)
        A = self.A()
        # dt is zero on padding, so the state at the end of the padded sequence is the state after its last
        # real token: the scan's final state is the decoding state.
        y, ssm_state = ssd_scan_chunked(x, dt, A, B, C, self.D, chunk_size=scan_chunk_size(cfg, x.device),
                                        return_final_state=True)
        y = self.norm(y.reshape(b, l, cfg.d_inner), z)
        result = MixerOutput(self.out_proj(y.to(hidden.dtype)))
        if keep_scan_inputs:
            result.scan = SSDScanInputs(x, dt, A, B, C, z)
        if final_state:
            result.conv_state = conv_state_at(xbc_in, lengths, cfg.d_conv)
            result.ssm_state = ssm_state
        return result

    def step(self, hidden, conv_state, ssm_state):
        """One token: hidden (b, d) -> (b, d); conv_state (b, D + 2 G N, d_conv) and ssm_state (b, H, P, N) are
        updated in place. The recurrence of `ssd_scan_ref`, one step."""
        cfg = self.cfg
        z, xbc, dt_raw = self.split_projection(hidden)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = xbc
        xbc = (conv_state * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            xbc = xbc + self.conv1d.bias
        x, B, C = self.split_xbc(F.silu(xbc))
        dtype = _compute_dtype(x)
        x, B, C = x.to(dtype), B.to(dtype), C.to(dtype)
        dt = self.step_sizes(dt_raw).to(dtype)  # (b, H)
        per_group = cfg.n_heads // cfg.n_groups
        B, C = B.repeat_interleave(per_group, dim=1), C.repeat_interleave(per_group, dim=1)  # (b, H, N)
        decay = torch.exp(dt * self.A().to(dtype))[..., None, None]  # (b, H, 1, 1)
        ssm_state.copy_(decay * ssm_state + (dt[..., None] * x)[..., None] * B[:, :, None, :])
        y = (ssm_state.to(dtype) @ C[..., None]).squeeze(-1) + self.D.to(dtype)[:, None] * x  # (b, H, P)
        y = self.norm(y.flatten(1), z)
        return self.out_proj(y.to(hidden.dtype))


class Mamba2Block(Block):
    """Mamba-1's pre-norm block (`models.mamba.Block`) around an SSD mixer."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__(cfg, RMSNorm(cfg.d_model, cfg.norm_eps), Mamba2Mixer(cfg))


class Mamba2LM(BlockLM):
    """Mamba-2 LM. State-dict keys are mamba-ssm's (`backbone.embedding`, `backbone.layers.i.mixer...`).

    Built with PyTorch's default initialisation (and A_log = dt_bias = 0), for weights that a checkpoint
    supplies; `reset_parameters` gives a model to train from scratch."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        self.backbone = nn.Module()
        self.backbone.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.backbone.layers = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.n_layer))
        self.backbone.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()

    def reset_parameters(self, seed: int | None = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                         a_range: tuple[float, float] = (1.0, 16.0)):
        """mamba-ssm's initialisation of a Mamba-2: dt log-uniform in [dt_min, dt_max] (its bias the inverse
        softplus), A_h uniform in `a_range` (A_log = log A_h), D = 1, linear and conv layers PyTorch's default
        (linear biases zero), the embedding normal with std 0.02, norms 1, and each out_proj scaled by
        1/sqrt(n_layer) (GPT-2's residual rescaling, as `MambaLM.reset_parameters`)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cfg = self.cfg
        with torch.no_grad():
            nn.init.normal_(self.backbone.embedding.weight, std=0.02, generator=gen)
            for block in self.layers:
                m = block.mixer
                for lin in (m.in_proj, m.out_proj):
                    nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
                    if lin.bias is not None:
                        lin.bias.zero_()
                m.out_proj.weight /= math.sqrt(cfg.n_layer)
                nn.init.kaiming_uniform_(m.conv1d.weight, a=math.sqrt(5), generator=gen)
                if m.conv1d.bias is not None:
                    bound = 1 / math.sqrt(cfg.d_conv)  # fan-in of a depthwise filter
                    nn.init.uniform_(m.conv1d.bias, -bound, bound, generator=gen)
                dt = torch.exp(torch.rand(cfg.n_heads, generator=gen) * (math.log(dt_max) - math.log(dt_min))
                               + math.log(dt_min)).clamp(min=1e-4)
                m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
                low, high = a_range
                m.A_log.copy_(torch.log(low + (high - low) * torch.rand(cfg.n_heads, generator=gen)))
                m.D.fill_(1.0)
                m.norm.weight.fill_(1.0)
                block.norm.weight.fill_(1.0)
            self.backbone.norm_f.weight.fill_(1.0)
            if not cfg.tie_embeddings:
                nn.init.kaiming_uniform_(self.lm_head.weight, a=math.sqrt(5), generator=gen)
        self.tie_weights()
