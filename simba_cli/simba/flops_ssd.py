"""FLOPs of a Mamba-2 (SSD) forward, per token and layer. 2 FLOPs per multiply-add, as in `simba.flops`.

Per token processed by a layer (d = d_model, D = d_inner = H P, H = n_heads, P = head_dim, G = n_groups,
N = d_state, k = d_conv):
    norm        4 d                      square, mean, scale, weight
    in_proj     2 d (2 D + 2 G N + H)    z, xBC and dt_raw
    conv        2 (D + 2 G N) k          depthwise, over xBC
    scan        5 H P N + 3 H P + H      the recurrence, counted as its loop does (below)
    gated_norm  4 D                      RMS over the G groups: square, mean, scale, weight
    out_proj    2 D d

The SSD convention: one step of the recurrent form, per head h,
    S_t = exp(dt_t A_h) S_{t-1} + (dt_t x_t) B_t^T        y_t = S_t C_t + D_h x_t
costs, per token,
    dt_t A_h                      H          one multiply per head (exp not counted)
    dt_t x_t                      H P        one multiply per channel
    exp(.) S_{t-1}                H P N      the decay, one multiply per state entry
    + (dt_t x_t) B_t^T            2 H P N    one multiply-add per state entry
    S_t C_t                       2 H P N    the readout, one multiply-add per state entry
    + D_h x_t                     2 H P      the skip, one multiply-add per channel
This is what the token-by-token loop (`models.mamba2.ssd_scan_ref`) does, whatever form actually runs
(the chunked matmul form does more arithmetic for short sequences and less memory traffic). Elementwise
activations (SiLU, softplus, exp), the dt bias and the gate product y * silu(z) are not counted, as in
`simba.flops` for Mamba-1.

Per token scored by a criterion, at the layer whose scan quantities it reads:
    simba*      2 G N + 4 H + 2 D    C_T . B_t per group; per head the running sum of dt, A S, and the two
                                     products (C_T . B_t) exp(A S) dt; per channel times x, and the max
    dt-norm     2 H                  output-norm  2 d                 random, uniform, recent  0
    simba-window (mean or max) runs that pass once per window position here (`criteria_beyond`): up to W passes,
    where Mamba-1's mean has a closed form of one
Per position whose logits are computed: the final norm 4 d and the LM head 2 d V.
"""

from __future__ import annotations

from simba_cli.models.mamba2 import Mamba2Config
from simba_cli.simba.criteria_beyond import cost_factor, parse_variant


def _official(d_model: int, n_layer: int) -> Mamba2Config:
    # mamba-ssm pads the GPT-NeoX vocabulary (50277) to a multiple of 16.
    return Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=50288, d_state=128, expand=2, head_dim=64,
                        n_groups=1, d_conv=4, chunk_size=256, tie_embeddings=True)


# The released state-spaces/mamba2-* checkpoints.
OFFICIAL_MAMBA2: dict[str, Mamba2Config] = {
    "mamba2-130m": _official(768, 24),
    "mamba2-370m": _official(1024, 48),
    "mamba2-780m": _official(1536, 48),
    "mamba2-1.3b": _official(2048, 48),
    "mamba2-2.7b": _official(2560, 64),
}


def scan_flops_per_token_ssd(cfg: Mamba2Config) -> int:
    h, p, n = cfg.n_heads, cfg.head_dim, cfg.d_state
    return 5 * h * p * n + 3 * h * p + h


def layer_flops_per_token_ssd(cfg: Mamba2Config) -> dict[str, int]:
    d, di, h, g, n, k = cfg.d_model, cfg.d_inner, cfg.n_heads, cfg.n_groups, cfg.d_state, cfg.d_conv
    return {
        "norm": 4 * d,
        "in_proj": 2 * d * (2 * di + 2 * g * n + h),
        "conv": 2 * (di + 2 * g * n) * k,
        "scan": scan_flops_per_token_ssd(cfg),
        "gated_norm": 4 * di,
        "out_proj": 2 * di * d,
    }


def count_layer_ssd(cfg: Mamba2Config, tokens: int) -> int:
    return tokens * sum(layer_flops_per_token_ssd(cfg).values())


def criterion_flops_per_token_ssd(cfg: Mamba2Config, criterion: str = "simba", passes: int | None = None) -> int:
    if criterion.startswith("simba"):
        extra = 2 * cfg.n_heads if criterion.startswith("simba-channels") else 0  # the decay sums
        one_pass = 2 * cfg.n_groups * cfg.d_state + 4 * cfg.n_heads + 2 * cfg.d_inner
        variant = parse_variant(criterion)
        if passes is None and variant is not None and variant.base == "simba-window":
            passes = variant.window  # the mean too runs position by position on Mamba-2 (W of them, or the
            # protected positions: `criteria_beyond.passes_run` counts what ran)
        return (passes or cost_factor(criterion)) * one_pass + extra
    return {"dt-norm": 2 * cfg.n_heads, "output-norm": 2 * cfg.d_model}.get(criterion, 0)


def count_criterion_ssd(cfg: Mamba2Config, criterion: str, tokens: int) -> int:
    return tokens * criterion_flops_per_token_ssd(cfg, criterion)


def count_head_ssd(cfg: Mamba2Config, positions: int) -> int:
    return positions * (4 * cfg.d_model + 2 * cfg.d_model * cfg.vocab_size)


def dense_flops_per_token_ssd(cfg: Mamba2Config) -> int:
    """Forward FLOPs per token of the dense Mamba-2 model, logits at every position."""
    return count_layer_ssd(cfg, 1) * cfg.n_layer + count_head_ssd(cfg, 1)
