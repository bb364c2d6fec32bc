"""FLOPs of a (pruned) Mamba forward, per layer and in total. 2 FLOPs per multiply-add.

Per token processed by a layer (d = d_model, D = d_inner, N = d_state, R = dt_rank, k = d_conv):
    norm      4 d            square, mean, scale, weight
    in_proj   2 d (2 D)
    conv      2 D k
    x_proj    2 D (R + 2N)
    dt_proj   2 R D
    scan      9 D N          mamba-ssm's convention
    out_proj  2 D d
    (Falcon-Mamba: 3 (R + 2N) more for the RMS norms on dt_low, B and C: square, mean, scale)
Elementwise activations (SiLU, softplus, the gate) are not counted, as in mamba-ssm.
Per token scored by a criterion, at the layer whose scan quantities it reads:
    simba     4 D N + 4 D    exp(A S), times C_T B_t, sum over N; times dt u; max over D; the cumsum
    dt-norm   2 D            output-norm  2 d            random, uniform, recent  0
Per position whose logits are computed: the final norm 4 d and the LM head 2 d V.

`analytic` counts from a schedule; `simba.pruned` counts the same terms from the tokens a real forward
processed ("measured"), with `count_layer`, `count_criterion` and `count_head` below.

Mamba-2 (SSD) layers have their own per-token terms (`simba.flops_ssd`); every function here takes either
family's config and dispatches on its type, so the schedule, the measured counts and the tables are shared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from simba_cli.models.config import MambaConfig
from simba_cli.models.mamba2 import Mamba2Config
from simba_cli.simba import flops_ssd
from simba_cli.simba.criteria_beyond import cost_factor, passes_planned
from simba_cli.simba.settings import mean_keep

Config = MambaConfig | Mamba2Config


def layer_flops_per_token(cfg: Config) -> dict[str, int]:
    if isinstance(cfg, Mamba2Config):
        return flops_ssd.layer_flops_per_token_ssd(cfg)
    d, di, n, r, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    per_token = {
        "norm": 4 * d,
        "in_proj": 2 * d * 2 * di,
        "conv": 2 * di * k,
        "x_proj": 2 * di * (r + 2 * n),
        "dt_proj": 2 * r * di,
        "scan": 9 * di * n,
        "out_proj": 2 * di * d,
    }
    if cfg.bcdt_rms:  # Falcon-Mamba's weightless RMS norms on dt_low, B and C
        per_token["bcdt_norm"] = 3 * (r + 2 * n)
    return per_token


def count_layer(cfg: Config, tokens: int) -> int:
    return tokens * sum(layer_flops_per_token(cfg).values())


def criterion_flops_per_token(cfg: Config, criterion: str, passes: int | None = None) -> int:
    """The criterion's FLOPs per scored token; `passes`: how many Simba passes ran (the window's `max` runs one
    per window position; None: as the criterion's options say, W)."""
    if isinstance(cfg, Mamba2Config):
        return flops_ssd.criterion_flops_per_token_ssd(cfg, criterion, passes)
    if criterion.startswith("simba"):  # the weighted form: an exp and 3 flops per (channel, state), 4 per channel
        extra = 2 * cfg.d_inner if criterion.startswith("simba-channels") else 0  # the decay sums
        return (passes or cost_factor(criterion)) * (4 * cfg.d_inner * cfg.d_state + 4 * cfg.d_inner) + extra
    return {"dt-norm": 2 * cfg.d_inner, "output-norm": 2 * cfg.d_model}.get(criterion, 0)


def count_criterion(cfg: Config, criterion: str, tokens: int, passes: int | None = None) -> int:
    return tokens * criterion_flops_per_token(cfg, criterion, passes)


def count_head(cfg: Config, positions: int) -> int:
    if isinstance(cfg, Mamba2Config):
        return flops_ssd.count_head_ssd(cfg, positions)
    return positions * (4 * cfg.d_model + 2 * cfg.d_model * cfg.vocab_size)


def dense_flops_per_token(cfg: Config) -> int:
    """Forward FLOPs per token of the dense model, logits at every position."""
    return count_layer(cfg, 1) * cfg.n_layer + count_head(cfg, 1)


@dataclass
class FlopsCount:
    """FLOPs of one forward (or the sum over many): per layer, and the totals."""

    tokens_in: list[int]  # tokens processed by each layer
    layer: list[int]  # FLOPs of each layer (the block itself)
    criterion: list[int]  # FLOPs of the criterion evaluated on each layer's tokens
    head: int  # final norm + LM head
    head_positions: int
    sequences: int = 1
    input_tokens: int = 0  # real tokens given to the model (the denominator of keep ratios)

    @property
    def total(self) -> int:
        return sum(self.layer) + sum(self.criterion) + self.head

    @property
    def keep_ratios(self) -> list[float]:
        """Tokens entering each layer over input tokens: what really ran."""
        return [t / max(1, self.input_tokens) for t in self.tokens_in]

    def __add__(self, other: FlopsCount) -> FlopsCount:
        return FlopsCount(
            [a + b for a, b in zip(self.tokens_in, other.tokens_in)],
            [a + b for a, b in zip(self.layer, other.layer)],
            [a + b for a, b in zip(self.criterion, other.criterion)],
            self.head + other.head, self.head_positions + other.head_positions,
            self.sequences + other.sequences, self.input_tokens + other.input_tokens,
        )

    @property
    def mean_keep(self) -> float:
        return mean_keep(self.keep_ratios)

    def __sub__(self, other: FlopsCount) -> FlopsCount:
        """What ran between two running totals (`after - before`)."""
        return FlopsCount(
            [a - b for a, b in zip(self.tokens_in, other.tokens_in)],
            [a - b for a, b in zip(self.layer, other.layer)],
            [a - b for a, b in zip(self.criterion, other.criterion)],
            self.head - other.head, self.head_positions - other.head_positions,
            self.sequences - other.sequences, self.input_tokens - other.input_tokens,
        )

    def summary(self) -> dict:
        """The measured record every result carries: FLOPs in total and per layer (each block's, each layer's
        criterion's, the head's), per input token, and the keep ratios."""
        return {"flops": self.total, "flops_per_input_token": self.total / max(1, self.input_tokens),
                "input_tokens": self.input_tokens, "head_positions": self.head_positions,
                "keep_ratios": [round(r, 5) for r in self.keep_ratios], "tokens_per_layer": self.tokens_in,
                "mean_keep": self.mean_keep, "flops_per_layer": self.layer, "criterion_flops_per_layer":
                self.criterion, "head_flops": self.head}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total=self.total, keep_ratios=self.keep_ratios)
        return d


def tokens_per_layer(keep_ratios: list[float], seq_len: int, min_tokens: int = 1) -> list[int]:
    """Tokens entering each layer: ceil(r_l * L), never below `min_tokens` (the protected positions)."""
    return [min(seq_len, max(min_tokens, math.ceil(r * seq_len - 1e-9))) for r in keep_ratios]


def analytic(cfg: Config, seq_len: int, keep_ratios: list[float] | None = None, criterion: str = "simba",
             head_positions: int | None = None, min_tokens: int = 1) -> FlopsCount:
    """FLOPs of one sequence of `seq_len` tokens under a schedule (None: dense).

    The criterion runs on layer l whenever fewer tokens enter layer l+1 than layer l. Logits are
    computed for `head_positions` positions (default: all, as in training and full perplexity).
    """
    ratios = keep_ratios if keep_ratios is not None else [1.0] * cfg.n_layer
    tokens = tokens_per_layer(ratios, seq_len, min_tokens)
    ssd = isinstance(cfg, Mamba2Config)
    crit = [count_criterion(cfg, criterion, t, passes_planned(criterion, t, ssd))
            if i + 1 < len(tokens) and tokens[i + 1] < t else 0 for i, t in enumerate(tokens)]
    positions = seq_len if head_positions is None else head_positions
    return FlopsCount(tokens, [count_layer(cfg, t) for t in tokens], crit, count_head(cfg, positions), positions,
                      1, seq_len)
