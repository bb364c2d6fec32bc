"""Token-importance criteria: the Simba score and the baselines.

Every criterion maps one layer's view of its current tokens to scores (b, l): higher is kept first;
padding positions get -inf. The selection (top-k, protection, order) lives in `simba.pruned`.

Simba. Unrolling the layer's recurrence, token t's contribution to the output at the last token T is

    dy_T(t) = sum_n C_T[n] * exp(A[:, n] * S_t) * dt_t * B_t[n] * u_t,   S_t = sum_{k=t+1..T} dt_k

a vector over channels d, equal to y_T(full) - y_T(u_t = 0) (the scan is linear in u). The score is
    simba        max_d dy_T(t)[d]            (signed, the paper's wording)
    simba-abs    max_d |dy_T(t)[d]|
    simba-gated  max_d dy_T(t)[d] * silu(z_T)[d]   (including the output gate at T)
S_t is a reverse exclusive cumulative sum and every exponent is <= 0 (A < 0, dt > 0), so the score is
parallel over t and stable. For a Mamba-2 (SSD) layer, whose scan inputs are `SSDScanInputs`, the same
three variants come from `simba.criteria_ssd` (a scalar decay per head: the sum over N factors out).

Baselines:
    random       uniform random scores, drawn per layer from the seed and each sequence's own tokens
    uniform      evenly spaced tokens (strided)
    recent       the most recent tokens (score = position)
    dt-norm      ||dt_t||_2 over channels (as DeciMamba); over heads for Mamba-2, whose dt is per head
    output-norm  sum over channels of the block output clipped at zero (as ToR / ToP-ViM)

Beyond the paper (`simba.criteria_beyond`, options after colons): simba-window[:W[:mean|max]],
simba-split[:share], simba-channels[:threshold]. Simba and these share one computation, the weighted form
    v_t[d] = dt_t[d] u_t[d] sum_n W[d, n] B_t[n] exp(A[d, n] S_t[d]),   S_t = sum_{k=t+1..start} dt_k,
with W[d, n] = C_T[n] and start = T for Simba (`weighted_contributions`; the CPU kernel in `score_cpu`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from simba_cli.errors import UserError
from simba_cli.models.mamba import ScanInputs
from simba_cli.models.mamba2 import SSDScanInputs
from simba_cli.simba.criteria_beyond import VARIANTS, parse_variant, variant_score
from simba_cli.simba.criteria_ssd import ssd_score

CRITERIA = ("simba", "simba-abs", "simba-gated", "random", "uniform", "recent", "dt-norm", "output-norm",
            *VARIANTS)


def base_name(criterion: str) -> str:
    """The criterion's name without its options ('simba-window:64:max' -> 'simba-window')."""
    return criterion.split(":")[0]


def needs_scan(criterion: str) -> bool:
    """Whether the criterion reads the layer's scan inputs (which the layer then keeps)."""
    return base_name(criterion).startswith("simba") or criterion == "dt-norm"


def check_criterion(name: str) -> str:
    """The name, if it names a criterion (with valid options); else a one-line error."""
    if not isinstance(name, str) or (parse_variant(name) is None and name not in CRITERIA):
        raise UserError(f"unknown criterion {name!r}; use one of {', '.join(CRITERIA)} (options after colons: "
                        f"simba-window:32:mean, simba-split:0.5, simba-channels:0.1)")
    return name


@dataclass
class LayerView:
    """What a criterion may look at, for the tokens currently entering the layer above."""

    scan: ScanInputs | SSDScanInputs | None  # the layer's scan inputs (u or x, dt, A, B, C, z), current tokens
    output: torch.Tensor  # (b, l, d) the layer's mixer output
    lengths: torch.Tensor  # (b,) real tokens per sequence
    keep: torch.Tensor  # (b,) how many tokens will be kept (used by `uniform`)
    layer: int
    seed: int = 0
    row_seeds: list[int] | None = None  # per sequence, from its tokens (`random`: independent of batching)
    protected: torch.Tensor | None = None  # (b, l) bool, positions never pruned (each last token among them)
    caller_protected: torch.Tensor | None = None  # (b,) bool, whether the caller protected any position


def weighted_contributions(u, dt, A, B, W, start) -> torch.Tensor:
    """v_t[d] = dt_t[d] u_t[d] sum_n W[d, n] B_t[n] exp(A[d, n] S_t[d]), S_t = sum_{k=t+1..start} dt_k, for
    every t <= start, else 0: (b, l, D). W (b, D, N), start (b,). The reference formula (materialises
    (b, chunk, D, N); for tests and devices without a kernel). Every exponent is <= 0."""
    b, l, d = u.shape
    t_idx = torch.arange(l, device=u.device)[None, :]
    upto = (t_idx <= start[:, None]).to(dt.dtype)[..., None]
    dtm = dt * upto
    S = dtm.flip(1).cumsum(1).flip(1) - dtm  # S_t = sum_{t < k <= start} dt_k
    W = W.to(dt.dtype)
    out = torch.empty_like(u, dtype=dt.dtype)
    step = max(1, (1 << 24) // max(1, d * A.shape[1] * b))
    for s in range(0, l, step):
        e = torch.exp(A[None, None] * S[:, s:s + step, :, None])  # (b, c, D, N)
        out[:, s:s + step] = torch.einsum("bcdn,bdn,bcn->bcd", e, W, B[:, s:s + step].to(e.dtype))
    return out * dt * u.to(dt.dtype) * upto


def simba_weights(C, T, channels: int) -> torch.Tensor:
    """Simba's weights in the weighted form: W[d, n] = C_T[n] for every channel d, (b, D, N); T (b,)."""
    return C[torch.arange(C.shape[0], device=C.device), T][:, None, :].expand(-1, channels, -1)


def simba_contributions(u, dt, A, B, C, last_idx) -> torch.Tensor:
    """dy_T(t) for every t, (b, l, D): the weighted form with W[d, n] = C_T[n], start = T."""
    return weighted_contributions(u, dt, A, B, simba_weights(C, last_idx, u.shape[2]), last_idx)


def reduce_channels(contrib, start, absolute=False, gate=None, use=None) -> torch.Tensor:
    """(b, l, D) contributions -> (b, l): the maximum over the used channels (of |v|, or of v times a gate
    (b, D)); -inf after each sequence's `start`."""
    if gate is not None:
        contrib = contrib * gate[:, None, :].to(contrib.dtype)
    if absolute:
        contrib = contrib.abs()
    if use is not None:
        contrib = contrib.masked_fill(~use[:, None, :], float("-inf"))
    scores = contrib.amax(-1)
    after = torch.arange(contrib.shape[1], device=contrib.device)[None, :] > start[:, None]
    return scores.masked_fill(after, float("-inf"))


def simba_score_reference(u, dt, A, B, C, last_idx, absolute=False, gate_T=None) -> torch.Tensor:
    return reduce_channels(simba_contributions(u, dt, A, B, C, last_idx), last_idx, absolute, gate_T)


def weighted_score(u, dt, A, B, W, start, absolute=False, gate=None, use=None) -> torch.Tensor:
    """The weighted form reduced over channels (`reduce_channels`), (b, l): the numba kernel for float32 on
    CPU, else the reference formula in the scan's dtype."""
    if u.device.type == "cpu" and dt.dtype == torch.float32:
        from simba_cli.simba.score_cpu import weighted_score_cpu

        return weighted_score_cpu(u, dt, A, B, W, start, absolute, gate, use)
    f = lambda x: x.to(dt.dtype)
    return reduce_channels(weighted_contributions(f(u), dt, f(A), f(B), W, start), start, absolute, gate, use)


def simba_score(scan: ScanInputs | SSDScanInputs, lengths: torch.Tensor, variant: str = "simba") -> torch.Tensor:
    """The Simba score of a layer's tokens, (b, l), by the fastest backend for the device (Mamba-1), or by the
    SSD formula (Mamba-2: cheap, one pass over x, no kernel needed)."""
    dt = scan.dt  # the scan's own step sizes, zero on padding
    last_idx = lengths - 1
    if isinstance(scan, SSDScanInputs):
        gated = variant == "simba-gated"  # the gate z at each last real token; ssd_score applies silu
        z_T = scan.z[torch.arange(scan.z.shape[0], device=scan.z.device), last_idx] if gated else None
        return ssd_score(scan.x, dt, scan.A, scan.B, scan.C, lengths, variant, z_T)
    gate_T = None
    if variant == "simba-gated":
        # at least float32 (a bf16 gate would round the score), float64 where the scan is (the reference)
        gate_T = F.silu(scan.z[torch.arange(scan.z.shape[0]), last_idx].to(torch.promote_types(dt.dtype,
                                                                                                 torch.float32)))
    absolute = variant == "simba-abs"
    u, A, B, C = scan.u, scan.A, scan.B, scan.C
    if u.device.type == "cuda":
        from simba_kernels.simba_score import simba_score as triton_score

        return triton_score(u, dt, A, B, C, last_idx, absolute=absolute, gate_T=gate_T)
    return weighted_score(u, dt, A, B, simba_weights(C, last_idx, u.shape[2]), last_idx, absolute, gate_T)


def _seed_of(data: bytes) -> int:
    """A non-negative 63-bit seed from bytes (stable across runs and machines, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def sequence_seeds(input_ids: torch.Tensor, lengths: torch.Tensor) -> list[int]:
    """A seed per sequence from its real tokens, (b,) -> list of ints."""
    ids = input_ids.cpu()
    return [_seed_of(ids[i, :n].numpy().tobytes()) for i, n in enumerate(lengths.tolist())]


def uniform_scores(lengths: torch.Tensor, keep: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """1 on evenly spaced positions of each sequence: as many as `keep` leaves beside its `protected` positions
    ((b, l) bool; `select` keeps those whatever their score), spaced over the unprotected real positions, the
    last of them included, so that exactly `keep` positions compete and no tie decides."""
    b, l = protected.shape
    pos = torch.arange(l, device=lengths.device)
    scores = torch.zeros(b, l, device=lengths.device)
    for i, (n, k) in enumerate(zip(lengths.tolist(), keep.tolist())):
        real = pos < n
        free = (real & ~protected[i]).nonzero().squeeze(1)
        slots = min(k - int((real & protected[i]).sum()), free.numel())
        if slots > 0:
            scores[i, free[torch.linspace(free.numel() - 1, 0, slots, device=lengths.device).round().long()]] = 1.0
    return scores


def score(criterion: str, view: LayerView) -> torch.Tensor:
    """Scores (b, l) for the tokens of `view`; padding gets -inf."""
    lengths = view.lengths
    b, l = view.output.shape[:2]
    device = view.output.device
    protected = view.protected
    if protected is None:  # the last token alone
        protected = torch.arange(l, device=device)[None, :] == lengths[:, None] - 1
    if parse_variant(criterion) is not None:
        caller = view.caller_protected if view.caller_protected is not None else torch.zeros_like(lengths).bool()
        scores = variant_score(criterion, view.scan, lengths, view.keep, protected, caller)
    elif criterion.startswith("simba"):
        scores = simba_score(view.scan, lengths, criterion)
    elif criterion == "random":
        # A fresh draw per sequence and layer, fixed by the seed and the sequence's own tokens: the same
        # document gets the same pattern in any batch, different documents (and training steps) differ.
        gen = torch.Generator(device="cpu")
        rows = view.row_seeds or [0] * b
        seeds = [_seed_of(repr((view.seed, view.layer, r)).encode()) for r in rows]
        scores = torch.stack([torch.rand(l, generator=gen.manual_seed(s)) for s in seeds]).to(device)
    elif criterion == "uniform":
        scores = uniform_scores(lengths, view.keep, protected)
    elif criterion == "recent":
        scores = torch.arange(l, device=device, dtype=torch.float32).expand(b, l).clone()
    elif criterion == "dt-norm":
        scores = view.scan.dt.float().norm(dim=-1)
    elif criterion == "output-norm":
        scores = view.output.float().clamp(min=0).sum(-1)
    else:
        raise UserError(f"unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    padding = torch.arange(l, device=device)[None, :] >= lengths[:, None]
    return scores.float().masked_fill(padding, float("-inf"))
