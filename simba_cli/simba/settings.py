"""The prune settings: one type from the command line, recipes, artifacts and lm-eval's model_args to the
pruned forward, the FLOPs count and the results tables.

    PruneConfig(schedule="linear", final_keep=0.1, criterion="simba")      the paper's setting
    DENSE                                                                   schedule none: no pruning
    config.keep_ratios(n_layer)      r_l, the share of the input entering each layer (simba.schedule)
    config.mean_keep(n_layer)        their mean: the share of the dense body's work that runs
    config.label()                   'dense', 'simba 0.1', 'recent 0.3 step from 4': a table's setting
    PruneConfig.from_mapping(raw, where)    from YAML or key=value strings, one-line errors naming the key
    base.override(final_keep=0.3)    given options over a model's own (an artifact's, or dense)

Rows of a comparison are identified by their PruneConfig (`key()`), never by parsing their labels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from simba_cli.errors import UserError
from simba_cli.simba.criteria import check_criterion
from simba_cli.simba.schedule import SCHEDULES, keep_ratios

MODES = ("exit", "protect")


PRUNING_OPTIONS = ("final_keep", "first_layer", "stages", "criterion")  # what only a pruning schedule reads


def check_dense_alone(given: dict, name=lambda key: key):
    """A one-line error where schedule none (the dense model) comes with options only a pruning schedule reads:
    they would have no effect, yet be recorded. `name` spells an option as the caller's user wrote it."""
    if given.get("schedule") != "none":
        return
    extra = [name(k) for k in PRUNING_OPTIONS if given.get(k) is not None]
    if extra:
        raise UserError(f"{name('schedule')} none runs the dense model, so {', '.join(extra)} would have no "
                        f"effect; drop {'it' if len(extra) == 1 else 'them'} or choose a schedule")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune: the schedule (kind, final_keep, first_layer, stages), the criterion, the output mode
    (exit: logits for every position; protect: for protected positions only) and the seed of `random`."""

    schedule: str = "linear"
    final_keep: float = 0.1
    first_layer: int = 1
    stages: int = 4
    criterion: str = "simba"
    mode: str = "exit"
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if isinstance(self.final_keep, bool) or not isinstance(self.final_keep, (int, float)) \
                or not 0 < self.final_keep <= 1:
            raise UserError(f"final_keep must be a number in (0, 1], got {self.final_keep!r}")
        for name, low in (("first_layer", 1), ("stages", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                why = " (layer 0 always sees every token)" if name == "first_layer" else ""
                raise UserError(f"{name} must be an integer of at least {low}{why}, got {value!r}")
        check_criterion(self.criterion)
        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; use exit or protect")

    @classmethod
    def from_mapping(cls, raw: dict, where: str, strings: bool = False) -> PruneConfig:
        """From a recipe's or artifact's mapping (or lm-eval's key=value strings, `strings=True`)."""
        from simba_cli.typed import build

        return build(cls, raw, where, strings)

    @property
    def dense(self) -> bool:
        return self.schedule == "none"

    def override(self, **given) -> PruneConfig:
        """These settings with the options a user gave (None: not given). Any pruning option given to a
        dense model means the paper's linear schedule unless a schedule is given too."""
        given = {k: v for k, v in given.items() if v is not None}
        check_dense_alone(given)
        start = PruneConfig() if self.dense and given and "schedule" not in given else self
        return dataclasses.replace(start, **given)

    def keep_ratios(self, n_layer: int) -> list[float]:
        return keep_ratios(self.schedule, self.final_keep, n_layer, self.first_layer, self.stages)

    def mean_keep(self, n_layer: int) -> float:
        return mean_keep(self.keep_ratios(n_layer))

    def describe(self) -> str:
        """'linear(final_keep=0.1, first_layer=1) by simba', or 'none'."""
        if self.dense:
            return "none"
        extra = f", stages={self.stages}" if self.schedule == "step" else ""
        by = "" if self.schedule == "truncate" else f" by {self.criterion}"  # truncate chooses no tokens
        return f"{self.schedule}(final_keep={self.final_keep:g}, first_layer={self.first_layer}{extra}){by}"

    def label(self) -> str:
        """A compact name for tables: 'dense', 'simba 0.1' (the linear schedule from layer 1), else with
        the schedule: 'recent 0.3 step from 4'; 'truncate 0.55' (the last 55% of the input, dense)."""
        if self.dense:
            return "dense"
        if self.schedule == "truncate":
            return f"truncate {self.final_keep:.4g}"
        text = f"{self.criterion} {self.final_keep:.4g}"
        if self.schedule != "linear":
            text += f" {self.schedule}"
        if self.first_layer != 1:
            text += f" from {self.first_layer}"
        return text

    def key(self) -> tuple:
        """What identifies a setting's results (the output mode and seed aside)."""
        if self.dense:
            return ("none",)
        if self.schedule == "truncate":
            return ("truncate", round(self.final_keep, 6))
        return (self.schedule, round(self.final_keep, 6), self.first_layer, self.stages, self.criterion)

    def to_dict(self) -> dict:
        return asdict(self)


DENSE = PruneConfig(schedule="none")


def mean_keep(ratios: list[float]) -> float:
    """The mean of per-layer keep ratios (analytic from a schedule, or measured from a forward)."""
    return sum(ratios) / len(ratios)


def check_seq_len(config: PruneConfig, n_layer: int, seq_len: int, n_protected: int = 1):
    """A one-line error when `seq_len` is too short for the schedule to mean anything."""
    if seq_len < 2:
        raise UserError(f"sequence length {seq_len} is too short to prune; use at least 2 tokens")
    last = max(1, math.ceil(config.keep_ratios(n_layer)[-1] * seq_len - 1e-9))
    if not config.dense and n_protected > last:
        raise UserError(f"sequence length {seq_len} is too short for {config.describe()}: its last layer keeps "
                        f"{last} token(s) but {n_protected} are protected; use a longer sequence, a larger "
                        f"final_keep or fewer protected positions")
