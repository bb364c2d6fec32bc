"""Criteria beyond the paper: Simba read against a window of outputs, beside recency, or in slow channels.

Simba scores token t by its contribution to the output at the last token T alone, and that contribution
decays with distance, so the score prefers recent tokens. Three answers, from KV-cache eviction in
Transformers and from long-context work on SSMs, each a criterion name with its options after colons
(one string for --criterion, recipes and lm-eval's model_args):

    simba-window[:W[:mean|max]]   t's contribution to the outputs at a window of positions: the caller's
                                  protected positions where it gave some (the continuation being scored,
                                  the tokens of a perplexity window), else the last W current tokens
                                  (SnapKV's observation window). Default W 32, mean.
        mean: max_d (1/|M|) sum_{T' in M, T' >= t} dy_T'(t)[d]   (the contribution to the window's mean
              output; closed form, one pass: Simba's cost)
        max:  max_{T' in M, T' >= t} max_d dy_T'(t)[d]            (|M| passes of Simba: |M| times its cost)
    simba-split[:share]           `share` of each layer's budget goes to its most recent tokens, the rest
                                  to the highest Simba scores (H2O's heavy hitters beside a recent window;
                                  StreamingLLM). Default share 0.5.
    simba-channels[:threshold]    Simba's maximum read only over the channels whose decay over the current
                                  context, max_n exp(A[d, n] sum_{k=1..T} dt_k[d]) (how much of the first
                                  token's state survives to the last), is at least `threshold` (LongMamba's
                                  global channels); where no channel reaches it, the slowest channel alone.
                                  Default threshold 0.1: on 1024 tokens of the training plays, 12-66% of
                                  a zoo layer's channels reach it (zoo-xxxs, zoo-xs, zoo-s; at 0.5, none
                                  in some layers; benchmarks/channel_decay.py).

dy_T'(t) is Simba's contribution (`simba.criteria`) with T' for T: dy_T'(t) = y_T'(full) - y_T'(u_t = 0)
for t < T' (the skip term D u_t left out at t = T', as Simba does). All three use the signed maximum.

The window's mean in closed form. With M the window's positions, the weights
    G_t[d, n] = sum_{T' in M, T' >= t} C_T'[n] exp(A[d, n] (dt_{t+1} + ... + dt_T'))
obey the backward recurrence G_t = [t in M] C_t + exp(A dt_{t+1}) G_{t+1}, and
    sum_{T' in M} dy_T'(t)[d] = dt_t[d] u_t[d] sum_n G_t[d, n] B_t[n].
Below the window's first position T0, G_t = exp(A S_t) G_T0 with S_t = dt_{t+1} + ... + dt_T0: Simba's
weighted form with W = G_T0 and start T0, so the kernel that computes Simba computes it too. The recurrence
runs only over the window's span; every exponent is <= 0 (A < 0, dt >= 0), so nothing overflows.

For a Mamba-2 (SSD) layer the decay is a scalar per head, the "channels" of simba-channels are heads, and
the window sums are taken directly over (t, T'), 16 window positions at a time (O(|M|) per token and head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from simba_cli.errors import UserError
from simba_cli.models.mamba2 import SSDScanInputs

VARIANTS = ("simba-window", "simba-split", "simba-channels")
REDUCTIONS = ("mean", "max")


@dataclass(frozen=True)
class Variant:
    """A parsed criterion of this module: its base name and options."""

    base: str
    window: int = 32
    reduce: str = "mean"
    share: float = 0.5
    threshold: float = 0.1


def _number(text: str, kind, what: str, spec: str):
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"criterion {spec!r}: {what} must be a number, got {text!r}") from None


def parse_variant(spec: str) -> Variant | None:
    """The Variant a criterion string names, None if it names none of this module's criteria; a one-line
    error for bad options ('simba-window:32:max', 'simba-split:0.25', 'simba-channels:0.01')."""
    base, *opts = spec.split(":")
    if base not in VARIANTS:
        return None
    usage = {"simba-window": "simba-window[:W[:mean|max]]", "simba-split": "simba-split[:share]",
             "simba-channels": "simba-channels[:threshold]"}[base]
    if len(opts) > (2 if base == "simba-window" else 1) or any(o == "" for o in opts):
        raise UserError(f"criterion {spec!r}: too many or empty options; use {usage}")
    if base == "simba-window":
        window = _number(opts[0], int, "the window W", spec) if opts else Variant.window
        reduce = opts[1] if len(opts) > 1 else Variant.reduce
        if window < 1:
            raise UserError(f"criterion {spec!r}: the window must hold at least 1 position; use {usage}")
        if reduce not in REDUCTIONS:
            raise UserError(f"criterion {spec!r}: unknown reduction {reduce!r}; use mean or max")
        return Variant(base, window=window, reduce=reduce)
    if base == "simba-split":
        share = _number(opts[0], float, "the recent share", spec) if opts else Variant.share
        if not 0 <= share <= 1:
            raise UserError(f"criterion {spec!r}: the recent share must lie in [0, 1]; use {usage}")
        return Variant(base, share=share)
    threshold = _number(opts[0], float, "the decay threshold", spec) if opts else Variant.threshold
    if not 0 < threshold <= 1:
        raise UserError(f"criterion {spec!r}: the decay threshold must lie in (0, 1]; use {usage}")
    return Variant(base, threshold=threshold)


def cost_factor(spec: str) -> int:
    """How many Simba passes a criterion costs per token, from its options alone (the window's max takes one
    per window position: W of them when the window is the last W tokens)."""
    v = parse_variant(spec)
    return v.window if v is not None and v.base == "simba-window" and v.reduce == "max" else 1


def _runs_by_position(spec: str, ssd: bool) -> Variant | None:
    """The window Variant whose cost is one Simba pass per window position: its max on either family, and its
    mean on Mamba-2 (`_window_ssd` sums the positions one by one; Mamba-1's mean carries one sum in one pass)."""
    v = parse_variant(spec)
    return v if v is not None and v.base == "simba-window" and (v.reduce == "max" or ssd) else None


def passes_run(spec: str, lengths, protected, caller, ssd: bool = False) -> int | None:
    """The Simba passes a window that runs by position (`_runs_by_position`) really runs on a batch: the most
    window positions of any sequence (its last W tokens, or every protected position where the caller
    protected some); None for every other criterion (their cost does not depend on the batch)."""
    v = _runs_by_position(spec, ssd)
    return None if v is None else int(window_mask(lengths, protected, caller, v.window).sum(1).max())


def passes_planned(spec: str, tokens: int, ssd: bool = False) -> int | None:
    """`passes_run` for a layer of `tokens` tokens with no caller protection (the analytic count): the window's
    last W tokens, fewer where fewer are left."""
    v = _runs_by_position(spec, ssd)
    return None if v is None else min(v.window, tokens)


# --- the window ------------------------------------------------------------------------------------------

def window_mask(lengths, protected, caller, window: int) -> torch.Tensor:
    """(b, l) bool, the positions whose outputs the window reads: a sequence's protected positions (its last
    token among them) where the caller protected some (`caller` (b,) bool), else its last `window` tokens."""
    l = protected.shape[1]
    pos = torch.arange(l, device=lengths.device)[None, :]
    last = (pos < lengths[:, None]) & (pos >= lengths[:, None] - window)
    return torch.where(caller[:, None], protected & (pos < lengths[:, None]), last)


def _window_rows(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first window position (b,), positions (b, J) of each sequence's window, its last one repeated)."""
    l = M.shape[1]
    pos = torch.arange(l, device=M.device).expand_as(M)
    first = torch.where(M, pos, l).amin(1)
    J = int(M.sum(1).max())
    ordered = torch.where(M, pos, -1).sort(1, descending=True).values[:, :J]  # the window, from the end
    ordered = torch.where(ordered < 0, ordered[:, :1], ordered)  # fewer positions: repeat the last one
    return first, ordered


def _window_mean_mamba(scan, lengths, M) -> torch.Tensor:
    from simba_cli.simba.criteria import reduce_channels, weighted_score

    u, dt, A, B, C = scan.u, scan.dt, scan.A, scan.B, scan.C
    dtype = dt.dtype
    b, l, D = u.shape
    N = A.shape[1]
    rows = torch.arange(b, device=u.device)
    first, _ = _window_rows(M)
    span = int((lengths - first).max())
    count = M.sum(1).clamp(min=1).to(dtype)
    A_ = A.to(dtype)
    G = torch.zeros(b, D, N, dtype=dtype, device=u.device)
    tail = torch.zeros(b, l, D, dtype=dtype, device=u.device)
    G_first = torch.zeros_like(G)
    for j in range(span):  # t = len - 1 - j per sequence, down to its window's first position
        t = lengths - 1 - j
        active = t >= first
        tc = t.clamp(min=0)
        if j:  # carry G from t + 1: decay by exp(A dt_{t+1})
            G = G * torch.exp(A_ * dt[rows, (tc + 1).clamp(max=l - 1)][..., None])
        G = G + (M[rows, tc] & active).to(dtype)[:, None, None] * C[rows, tc].to(dtype)[:, None, :]
        v = (G * B[rows, tc].to(dtype)[:, None, :]).sum(-1) * dt[rows, tc] * u[rows, tc].to(dtype)
        tail[rows[active], tc[active]] = v[active]
        G_first = torch.where((t == first)[:, None, None], G, G_first)
    head = weighted_score(u, dt, A, B, G_first / count[:, None, None], first)  # t <= first
    pos = torch.arange(l, device=u.device)[None, :]
    tail_scores = reduce_channels(tail / count[:, None, None], lengths - 1)
    return torch.where(pos > first[:, None], tail_scores, head.to(tail_scores.dtype))


def _window_max_mamba(scan, lengths, M) -> torch.Tensor:
    from simba_cli.simba.criteria import simba_weights, weighted_score

    u, dt, A, B, C = scan.u, scan.dt, scan.A, scan.B, scan.C
    _, ordered = _window_rows(M)
    best = None
    for j in range(ordered.shape[1]):
        T = ordered[:, j]
        s = weighted_score(u, dt, A, B, simba_weights(C, T, u.shape[2]), T)  # -inf after T
        best = s if best is None else torch.maximum(best, s)
    return best


def _window_ssd(scan: SSDScanInputs, lengths, M, reduce: str, block: int = 16) -> torch.Tensor:
    """The window for an SSD layer, directly: coef[t, j, h] = exp(A_h (R_t - R_T'j)) (C_T'j . B_t) for t <= T'j,
    R_t = sum_{k > t} dt_k (float64, so the difference is exact enough), then dt_t x_t[h, :] times it; `block`
    window positions at a time, so memory is O(b l block H) however many positions the caller protects."""
    x, dt, A, B, C = scan.x, scan.dt, scan.A, scan.B, scan.C
    b, l, H, P = x.shape
    G = B.shape[-2]
    rows = torch.arange(b, device=x.device)
    pos = torch.arange(l, device=x.device)
    real = (pos[None, :] < lengths[:, None]).double()[..., None]  # padding's dt never enters a sum
    dtr = dt.double() * real
    _, ordered = _window_rows(M)  # (b, J)
    R = dtr.flip(1).cumsum(1).flip(1) - dtr  # (b, l, H): sum_{k > t} dt_k
    distinct = torch.ones_like(ordered, dtype=torch.bool)
    distinct[:, 1:] = ordered[:, 1:] != ordered[:, :1]  # repeated positions count once
    xd = x.double()
    hi, lo = xd.amax(-1)[:, :, None], xd.amin(-1)[:, :, None]  # (b, l, 1, H)
    total = torch.zeros(b, l, H, dtype=torch.float64, device=x.device)
    best = torch.full((b, l), float("-inf"), dtype=torch.float64, device=x.device)
    for j0 in range(0, ordered.shape[1], block):
        T = ordered[:, j0:j0 + block]  # (b, J')
        S = (R[:, :, None] - R[rows[:, None], T][:, None]).clamp(min=0)  # (b, l, J', H)
        causal = pos[None, :, None] <= T[:, None, :]  # (b, l, J')
        C_T = C[rows[:, None], T].double()  # (b, J', G, N)
        cb = torch.einsum("bjgn,blgn->bljg", C_T, B.double()).repeat_interleave(H // G, dim=-1)  # (b, l, J', H)
        coef = (cb * torch.exp(A.double() * S)) * causal[..., None] * dtr[:, :, None]
        if reduce == "mean":
            total += (coef * distinct[:, None, j0:j0 + block, None]).sum(2)
        else:  # the signed max over p of a scalar times x[h, :] is the scalar times max or min of x[h, :]
            vals = torch.where(coef >= 0, coef * hi, coef * lo).masked_fill(~causal[..., None], float("-inf"))
            best = torch.maximum(best, vals.flatten(2).amax(-1))
    if reduce == "mean":
        coef = total / M.sum(1).clamp(min=1)[:, None, None]  # (b, l, H)
        best = (coef[..., None] * xd).flatten(2).amax(-1)
    return best.to(torch.promote_types(x.dtype, torch.float32))


def window_score(v: Variant, scan, lengths, protected, caller) -> torch.Tensor:
    M = window_mask(lengths, protected, caller, v.window)
    if isinstance(scan, SSDScanInputs):
        return _window_ssd(scan, lengths, M, v.reduce)
    if v.reduce == "max":
        return _window_max_mamba(scan, lengths, M)
    return _window_mean_mamba(scan, lengths, M)


# --- the split budget -------------------------------------------------------------------------------------

def split_score(v: Variant, scan, lengths, keep) -> torch.Tensor:
    """Scores whose top keep[b] are the last round(share * keep) tokens, then the best by Simba: Simba's
    ranks (0 .. l-1) for the rest, l + position for the recent ones (exact in float32)."""
    from simba_cli.simba.criteria import simba_score

    s = simba_score(scan, lengths).float()
    b, l = s.shape
    ranks = s.argsort(1).argsort(1).float()
    recent = torch.round(keep.double() * v.share).long()
    pos = torch.arange(l, device=s.device)[None, :]
    is_recent = (pos >= (lengths - recent)[:, None]) & (pos < lengths[:, None])
    return torch.where(is_recent, l + pos.float(), ranks)


# --- the slow channels -----------------------------------------------------------------------------------

def slow_channels(log_decay: torch.Tensor, threshold: float) -> torch.Tensor:
    """(b, K) bool: log decay at least log(threshold), or (where none is) the slowest channel alone."""
    bar = torch.minimum(torch.full_like(log_decay[:, 0], math.log(threshold)), log_decay.amax(1))
    return log_decay >= bar[:, None]


def channel_decay(scan, lengths) -> torch.Tensor:
    """Log of each channel's decay over the current context, (b, D) for Mamba-1 (the slowest state), (b, H)
    for SSD: A * sum_{k=1..T} dt_k."""
    pos = torch.arange(1, scan.dt.shape[1], device=scan.dt.device)[None, :]
    real = (pos < lengths[:, None]).to(torch.float64)  # positions 1 .. T
    S0 = (scan.dt[:, 1:].double() * real[..., None]).sum(1)  # (b, D) or (b, H)
    if isinstance(scan, SSDScanInputs):
        return scan.A.double() * S0
    return scan.A.double().amax(1) * S0


def channels_score(v: Variant, scan, lengths) -> torch.Tensor:
    from simba_cli.simba.criteria import simba_weights, weighted_score
    from simba_cli.simba.criteria_ssd import ssd_contributions

    use = slow_channels(channel_decay(scan, lengths), v.threshold)
    last = lengths - 1
    if isinstance(scan, SSDScanInputs):
        contrib = ssd_contributions(scan.x, scan.dt, scan.A, scan.B, scan.C, lengths)  # (b, l, H, P)
        contrib = contrib.masked_fill(~use[:, None, :, None], float("-inf"))
        pos = torch.arange(contrib.shape[1], device=contrib.device)[None, :]
        return contrib.flatten(2).amax(-1).masked_fill(pos > last[:, None], float("-inf"))
    return weighted_score(scan.u, scan.dt, scan.A, scan.B, simba_weights(scan.C, last, scan.u.shape[2]), last,
                          use=use)


def variant_score(spec: str, scan, lengths, keep, protected, caller) -> torch.Tensor:
    """Scores (b, l) of the criterion `spec` (this module's), -inf on padding."""
    v = parse_variant(spec)
    if v.base == "simba-window":
        s = window_score(v, scan, lengths, protected, caller)
    elif v.base == "simba-split":
        s = split_score(v, scan, lengths, keep)
    else:
        s = channels_score(v, scan, lengths)
    padding = torch.arange(s.shape[1], device=s.device)[None, :] >= lengths[:, None]
    return s.masked_fill(padding, float("-inf"))
