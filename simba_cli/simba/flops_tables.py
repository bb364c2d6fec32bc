"""FLOPs tables and FLOPs matching for `simba flops-report` and `simba flops-match`, without weights.

A model is named by an official size (mamba-130m, state-spaces/mamba-370m, ...-hf; mamba2-130m ...
mamba2-2.7b: the config is built in), a zoo name, a local directory (Mamba-1 or Mamba-2) or a pruned
artifact; only its config is read.

Matching: a pruned model's FLOPs are a step function of final_keep (token counts are ceil(r_l L)) that
rises with it, up to small dips where the criterion's own cost appears or vanishes (it runs only on a
layer whose successor sees fewer tokens). Bisection finds a final_keep within the target at the
resolution of those steps; it may sit one step below the largest such value. When even the smallest
useful final_keep (one token in the last layer) costs more, no value can match: the result says how
close it gets and which other option would reach the target.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from simba_cli.errors import UserError
from simba_cli.models.checkpoint import read_config
from simba_cli.models.config import official_config
from simba_cli.models.hub import UnknownModel, resolve
from simba_cli.simba.flops import Config, analytic
from simba_cli.simba.flops_ssd import OFFICIAL_MAMBA2
from simba_cli.simba.settings import DENSE, PruneConfig, check_seq_len, mean_keep


def official(name: str) -> Config | None:
    """The built-in config of an official Mamba-1 or Mamba-2 size (`mamba-130m`, `state-spaces/mamba2-370m`,
    `...-hf`), or None."""
    return official_config(name) or OFFICIAL_MAMBA2.get(name.split("/")[-1].removesuffix("-hf"))


def model_config(ref: str) -> tuple[Config, PruneConfig | None]:
    """(architecture, the artifact's prune config or None) for a model reference, reading no weights."""
    from simba_cli.simba.artifact import is_artifact, read_artifact

    prune = None
    if is_artifact(ref):
        ref, prune, _ = read_artifact(ref)
    if (cfg := official(ref)) is not None:
        return cfg, prune
    try:
        return read_config(resolve(ref))[0], prune
    except UnknownModel as e:  # say which sizes need no weights at all
        from simba_cli.models.config import OFFICIAL

        sizes = ", ".join([*OFFICIAL, *OFFICIAL_MAMBA2])
        raise UserError(f"{e} (flops-report and flops-match also take, without weights: {sizes})") from None


def flops(cfg: Config, config: PruneConfig, seq_len: int, head: str = "all"):
    """Analytic FLOPs of one sequence. head: logits at "all" positions (perplexity) or the "last" one."""
    if head not in ("all", "last"):
        raise UserError(f"head must be all or last, got {head!r}")
    if seq_len < 1:
        raise UserError(f"--seq-len must be a positive number of tokens, got {seq_len}")
    if config.schedule != "none":
        check_seq_len(config, cfg.n_layer, seq_len)
    ratios = None if config.schedule == "none" else config.keep_ratios(cfg.n_layer)
    return analytic(cfg, seq_len, ratios, config.criterion, head_positions=seq_len if head == "all" else 1)


def summary_row(name: str, cfg: Config, config: PruneConfig, seq_len: int, head: str = "all") -> dict:
    count = flops(cfg, config, seq_len, head)
    dense = flops(cfg, DENSE, seq_len, head).total
    return {
        "model": name, "d_model": cfg.d_model, "n_layer": cfg.n_layer, "setting": config.label(),
        "seq_len": seq_len, "mean_keep": round(mean_keep(count.keep_ratios), 4),
        "GFLOPs": count.total / 1e9, "FLOPs/token": count.total / seq_len,
        "vs_dense": count.total / dense, "head_share": count.head / count.total,
    }


def layer_rows(name: str, cfg: Config, config: PruneConfig, seq_len: int, head: str = "all") -> list[dict]:
    count = flops(cfg, config, seq_len, head)
    return [{"model": name, "layer": i, "tokens_in": t, "keep": t / seq_len, "MFLOPs": f / 1e6,
             "criterion_MFLOPs": c / 1e6}
            for i, (t, f, c) in enumerate(zip(count.tokens_in, count.layer, count.criterion))]


@dataclass
class Match:
    big: str
    target: str
    seq_len: int
    head: str
    target_flops: int
    dense_flops: int  # the big model dense
    reachable: bool
    final_keep: float | None  # the largest final_keep within the target (None if unreachable)
    flops: int  # of the big model at that final_keep (at the smallest one if unreachable)
    config: PruneConfig | None
    hints: list[str] = dataclasses.field(default_factory=list)  # changes that would make it reachable

    @property
    def ratio(self) -> float:
        return self.flops / self.target_flops

    @property
    def unneeded(self) -> bool:
        """The model costs less than the target dense: there is nothing to match."""
        return self.reachable and self.final_keep >= 1 and self.ratio < 1

    def message(self) -> str:
        if self.unneeded:
            return (f"no pruning needed: {self.big} dense already costs {self.ratio:.4f}x {self.target} dense "
                    f"({self.flops / 1e9:.4g} against {self.target_flops / 1e9:.4g} GFLOPs per {self.seq_len}-token "
                    f"sequence); pruning only makes it cheaper")
        if self.reachable:
            return (f"{self.big} with {self.config.describe()} costs {self.flops / 1e9:.4g} GFLOPs per "
                    f"{self.seq_len}-token sequence, {self.ratio:.4f}x {self.target} dense "
                    f"({self.target_flops / 1e9:.4g} GFLOPs)")
        return (f"no final_keep can match: {self.big} costs at least {self.flops / 1e9:.4g} GFLOPs per "
                f"{self.seq_len}-token sequence ({self.ratio:.2f}x {self.target} dense, "
                f"{self.target_flops / 1e9:.4g} GFLOPs) even keeping one token at the last layer; "
                + (f"it can with {' or '.join(self.hints)}" if self.hints else
                   "no schedule can: compare with a larger target"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["config"] = None if self.config is None else self.config.to_dict()
        d["ratio"] = self.ratio
        return d


def match_final_keep(big: str, target: str, seq_len: int = 2048, base: PruneConfig | None = None,
                     head: str = "all", tolerance: float = 1e-6) -> Match:
    """The largest final_keep at which `big`, pruned with `base`'s schedule and criterion, costs at most
    what `target` costs dense, for one sequence of `seq_len` tokens."""
    base = base or PruneConfig()
    if base.schedule == "none":
        raise UserError("flops-match needs a pruning schedule (linear, cosine, constant, step or truncate), not none")
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    big_cfg, _ = model_config(big)
    target_cfg, _ = model_config(target)
    goal = flops(target_cfg, DENSE, seq_len, head).total
    dense = flops(big_cfg, DENSE, seq_len, head).total
    with_keep = lambda k: dataclasses.replace(base, final_keep=k)
    cost = lambda k: flops(big_cfg, with_keep(k), seq_len, head).total
    lo = 1.0 / seq_len  # one token at the last layer: anything smaller is the same schedule
    if cost(lo) > goal:
        return Match(big, target, seq_len, head, goal, dense, False, None, cost(lo), None,
                     _reachable_with(big_cfg, target_cfg, base, seq_len, head))
    if cost(1.0) <= goal:
        return Match(big, target, seq_len, head, goal, dense, True, 1.0, cost(1.0), with_keep(1.0))
    hi = 1.0
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if cost(mid) <= goal:
            lo = mid
        else:
            hi = mid
    return Match(big, target, seq_len, head, goal, dense, True, lo, cost(lo), with_keep(lo))


def _reachable_with(big_cfg: Config, target_cfg: Config, base: PruneConfig, seq_len: int,
                    head: str) -> list[str]:
    """The options of `flops-match` that would let some final_keep reach the target, each tried alone."""
    tries = []
    if head == "all":
        tries.append(("--head last", base, "last"))
    if base.first_layer > 1:
        tries.append(("--first-layer 1", dataclasses.replace(base, first_layer=1), head))
    if base.schedule != "constant":
        tries.append(("--schedule constant", dataclasses.replace(base, schedule="constant"), head))
    lo = 1.0 / seq_len
    return [flag for flag, config, h in tries
            if flops(big_cfg, dataclasses.replace(config, final_keep=lo), seq_len, h).total
            <= flops(target_cfg, DENSE, seq_len, h).total]
