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
    chunk_size Q        block length of the chunked (matmul) scan
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

Blocks are pre-norm with a separate residual stream, as in the Mamba-1 model (`simba_cli.models.mamba`):
    residual = hidden + residual;  hidden = mixer(norm(residual));  logits = lm_head(norm_f(hidden + residual))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from simba_cli.errors import UserError
from simba_cli.models.mamba import RMSNorm
from simba_cli.ops.conv import causal_conv1d


@dataclass(frozen=True)
class Mamba2Config:
    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 128
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    d_conv: int = 4
    chunk_size: int = 256
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    residual_in_fp32: bool = True
    dt_limit: tuple[float, float] = (0.0, math.inf)

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "expand", "head_dim", "n_groups", "d_conv",
                     "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"Mamba-2 config: {name} must be a positive integer, got {value!r}; fix config.json")
        if self.d_inner % self.head_dim:
            raise UserError(f"Mamba-2 config: expand × d_model = {self.d_inner} is not a multiple of head_dim "
                            f"{self.head_dim}; fix config.json")
        if self.n_heads % self.n_groups:
            raise UserError(f"Mamba-2 config: {self.n_heads} heads do not split into n_groups {self.n_groups}; "
                            f"fix config.json")
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, cfg: dict) -> Mamba2Config:
        """From the config.json of Hugging Face `Mamba2ForCausalLM` (model_type "mamba2")."""
        try:
            limit = _dt_limit(cfg.get("time_step_limit", (0.0, math.inf)))
            out = cls(
                d_model=cfg["hidden_size"],
                n_layer=cfg["num_hidden_layers"],
                vocab_size=cfg["vocab_size"],
                d_state=cfg.get("state_size", 128),
                expand=cfg.get("expand", 2),
                head_dim=cfg.get("head_dim", 64),
                n_groups=cfg.get("n_groups", 8),
                d_conv=cfg.get("conv_kernel", 4),
                chunk_size=cfg.get("chunk_size", 256),
                conv_bias=cfg.get("use_conv_bias", True),
                bias=cfg.get("use_bias", False),
                norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=cfg.get("tie_word_embeddings", False),
                residual_in_fp32=cfg.get("residual_in_fp32", True),
                dt_limit=limit,
            )
        except KeyError as e:
            raise UserError(f"Mamba-2 config.json lacks the key {e.args[0]!r}; is this a Mamba2ForCausalLM "
                            f"config?") from e
        heads = cfg.get("num_heads", out.n_heads)
        if heads != out.n_heads:
            raise UserError(f"Mamba-2 config: num_heads {heads} × head_dim {out.head_dim} != expand × hidden_size "
                            f"{out.d_inner}; fix config.json")
        return out

    def to_hf(self) -> dict:
        return {
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.vocab_size,
            "state_size": self.d_state,
            "expand": self.expand,
            "head_dim": self.head_dim,
            "num_heads": self.n_heads,
            "n_groups": self.n_groups,
            "conv_kernel": self.d_conv,
            "chunk_size": self.chunk_size,
            "use_conv_bias": self.conv_bias,
            "use_bias": self.bias,
            "layer_norm_epsilon": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "residual_in_fp32": self.residual_in_fp32,
            "time_step_limit": [v if math.isfinite(v) else {"__float__": str(v).replace("inf", "Infinity")}
                                for v in self.dt_limit],
            "hidden_act": "silu",
        }


def _dt_limit(value) -> tuple[float, float]:
    """HF's time_step_limit: two numbers, where transformers writes infinity as {"__float__": "Infinity"}."""
    try:
        low, high = (float(v["__float__"] if isinstance(v, dict) else v) for v in value)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"Mamba-2 config: time_step_limit must be two numbers, got {value!r}; fix config.json") \
            from e
    if not 0 <= low <= high:
        raise UserError(f"Mamba-2 config: time_step_limit must be 0 <= low <= high, got {value!r}; fix config.json")
    return low, high


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


def ssd_scan_chunked(x, dt, A, B, C, D=None, chunk_size: int = 256, return_final_state: bool = False):
    """The matmul form: within each chunk of Q tokens a masked (Q, Q) product, across chunks the recurrence.

    The sequence is padded with dt = 0 to a multiple of Q: a padded step neither decays nor adds to the state.
    """
    b, l, H, P = x.shape
    G, N = B.shape[-2:]
    dtype = _compute_dtype(x)
    x, dt, A, B, C = (t.to(dtype) for t in (x, dt, A, B, C))
    Q = chunk_size
    pad = (-l) % Q
    xc, dtc, Bc, Cc = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)).unflatten(1, (-1, Q)) for t in (x, dt, B, C))
    # xc (b, c, Q, H, P); dtc (b, c, Q, H); Bc, Cc (b, c, Q, G, N)
    a = (dtc * A).transpose(-1, -2)  # (b, c, H, Q), non-positive
    seg = _segment_sums(a)  # (b, c, H, Q, Q): decay from s to t
    decay_in = seg[..., -1, :]  # (b, c, H, Q): from s to the chunk's end
    decay_from_start = a.cumsum(-1)  # (b, c, H, Q): from the chunk's start (before token 0) to t
    u = _heads_by_group(dtc[..., None] * xc, G)  # (b, c, Q, G, R, P), R = H / G heads per group

    # 1. Within a chunk: y[t] = sum_{s <= t} (C_t . B_s) exp(seg[t, s]) dt_s x_s
    scores = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)  # (b, c, G, Q, Q)
    weights = _heads_by_group(torch.exp(seg).flatten(-2), G).unflatten(-1, (Q, Q)) * scores[:, :, :, None]
    y = torch.einsum("bcgrts,bcsgrp->bctgrp", weights, u)

    # 2. Each chunk's own contribution to the state at its end, from a zero state at its start.
    w_in = _heads_by_group(torch.exp(decay_in), G)  # (b, c, G, R, Q)
    chunk_states = torch.einsum("bcgrs,bcsgrp,bcsgn->bcgrpn", w_in, u, Bc)

    # 3. Across chunks: the state entering each chunk.
    chunk_decay = _heads_by_group(torch.exp(decay_from_start[..., -1])[..., None], G)[..., 0]  # (b, c, G, R)
    state = x.new_zeros(b, G, H // G, P, N)
    entering = []
    for c in range(chunk_states.shape[1]):
        entering.append(state)
        state = chunk_decay[:, c, ..., None, None] * state + chunk_states[:, c]
    entering = torch.stack(entering, 1) if entering else chunk_states  # (b, c, G, R, P, N)

    # 4. The entering state read out within the chunk, decayed to each t.
    w_out = _heads_by_group(torch.exp(decay_from_start), G)  # (b, c, G, R, Q)
    y = y + torch.einsum("bctgn,bcgrpn,bcgrt->bctgrp", Cc, entering, w_out)

    y = y.flatten(3, 4).flatten(1, 2)[:, :l]  # (b, l, H, P)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x
    return (y, state.flatten(1, 2)) if return_final_state else y


# --- the model -------------------------------------------------------------------------------------


class GatedRMSNorm(nn.Module):
    """norm(y * silu(z)): RMS over each of `groups` equal slices of the channels, then one weight per channel."""

    def __init__(self, d: int, groups: int, eps: float):
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y, z):
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        h = h.unflatten(-1, (self.groups, -1))
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * h.to(dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_inner + cfg.conv_dim + cfg.n_heads, bias=cfg.bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(cfg.n_heads))
        self.A_log = nn.Parameter(torch.zeros(cfg.n_heads))
        self.D = nn.Parameter(torch.ones(cfg.n_heads))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)

    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def forward(self, hidden, lengths=None):
        """hidden (b, l, d) -> (b, l, d). Right padding never reaches real tokens: conv and scan are causal."""
        cfg = self.cfg
        b, l, _ = hidden.shape
        z, xbc, dt_raw = self.in_proj(hidden).split([cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1)
        xbc = causal_conv1d(xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, silu=True)
        x, B, C = xbc.split([cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_groups * cfg.d_state], dim=-1)
        dt = F.softplus(dt_raw.float() + self.dt_bias.float()).clamp(*cfg.dt_limit)
        y = ssd_scan_chunked(
            x.reshape(b, l, cfg.n_heads, cfg.head_dim), dt, self.A(),
            B.reshape(b, l, cfg.n_groups, cfg.d_state), C.reshape(b, l, cfg.n_groups, cfg.d_state),
            self.D, chunk_size=cfg.chunk_size,
        )
        y = self.norm(y.reshape(b, l, cfg.d_inner), z)
        return self.out_proj(y.to(hidden.dtype))


class Mamba2Block(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg)

    def add_residual(self, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return residual.float() if self.residual_in_fp32 else residual

    def forward(self, hidden, residual, lengths=None):
        """Returns (mixer output, residual): the mixer's output and the stream entering this block."""
        residual = self.add_residual(hidden, residual)
        return self.mixer(self.norm(residual.to(self.norm.weight.dtype)), lengths), residual


class Mamba2LM(nn.Module):
    """Mamba-2 LM. State-dict keys are mamba-ssm's (`backbone.embedding`, `backbone.layers.i.mixer...`)."""

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        self.backbone = nn.Module()
        self.backbone.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.backbone.layers = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.n_layer))
        self.backbone.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def tie_weights(self):
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def embed(self, input_ids):
        return self.backbone.embedding(input_ids)

    def logits_from_stream(self, stream):
        return self.lm_head(self.backbone.norm_f(stream.to(self.backbone.norm_f.weight.dtype)))

    def forward(self, input_ids, lengths=None):
        """Dense forward: input_ids (b, l) -> logits (b, l, V). Positions past `lengths` are padding."""
        hidden, residual = self.embed(input_ids), None
        for block in self.layers:
            hidden, residual = block(hidden, residual, lengths)
        return self.logits_from_stream(hidden + residual)
