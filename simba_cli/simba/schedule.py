"""Hierarchical keep schedules: the share r_l of the input tokens that enters each layer l.

Tokens only ever leave: r is non-increasing, r_0 = 1 (the first layer sees everything), and the layers
before `first_layer` keep everything too. With f = first_layer and n layers:

    none      r_l = 1
    linear    r_l = 1 - (1 - final_keep) * (l - f + 1) / (n - f)     for l >= f      (the paper's)
    cosine    r_l = final_keep + (1 - final_keep) * (1 + cos(pi x)) / 2,  x = (l - f + 1) / (n - f)
    constant  r_l = final_keep                                          for l >= f
    step      `stages` equal groups of layers from f on, stepping from 1 down to final_keep

so that linear, cosine and step reach final_keep at the last layer. With linear to 0.1 from layer 1,
the mean keep ratio is 0.55. Layer l computes the criterion on its own tokens and keeps the top
ceil(r_{l+1} L) of them for layer l + 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from simba_cli.errors import UserError

SCHEDULES = ("none", "linear", "cosine", "constant", "step")


@dataclass(frozen=True)
class Schedule:
    kind: str = "linear"
    final_keep: float = 0.1
    first_layer: int = 1
    stages: int = 4

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise UserError(f"unknown schedule {self.kind!r}; use one of {', '.join(SCHEDULES)}")
        if not (isinstance(self.final_keep, (int, float)) and 0 < self.final_keep <= 1):
            raise UserError(f"final_keep must be in (0, 1], got {self.final_keep!r}")
        if self.first_layer < 1:
            raise UserError(f"first_layer must be at least 1 (layer 0 always sees every token), got {self.first_layer}")
        if self.stages < 1:
            raise UserError(f"stages must be at least 1, got {self.stages}")

    def keep_ratios(self, n_layer: int) -> list[float]:
        """r_l for l = 0 .. n_layer - 1."""
        if self.kind == "none" or n_layer == 1:
            return [1.0] * n_layer
        f = self.first_layer
        if f >= n_layer:
            raise UserError(f"first_layer {f} leaves nothing to prune in a {n_layer}-layer model; "
                            f"use a value below {n_layer}")
        span = n_layer - f
        ratios = []
        for layer in range(n_layer):
            if layer < f:
                ratios.append(1.0)
                continue
            x = (layer - f + 1) / span
            if self.kind == "linear":
                r = 1 - (1 - self.final_keep) * x
            elif self.kind == "cosine":
                r = self.final_keep + (1 - self.final_keep) * 0.5 * (1 + math.cos(math.pi * x))
            elif self.kind == "constant":
                r = self.final_keep
            else:  # step: stage s of `stages` keeps 1 - (1 - final_keep) * (s + 1) / stages
                stage = min(self.stages - 1, (layer - f) * self.stages // span)
                r = 1 - (1 - self.final_keep) * (stage + 1) / self.stages
            ratios.append(r)
        return ratios

    def describe(self) -> str:
        if self.kind == "none":
            return "none"
        extra = f", stages={self.stages}" if self.kind == "step" else ""
        return f"{self.kind}(final_keep={self.final_keep:g}, first_layer={self.first_layer}{extra})"

    def to_dict(self) -> dict:
        return asdict(self)


def mean_keep(ratios: list[float]) -> float:
    return sum(ratios) / len(ratios)
