"""Hierarchical keep schedules: the share r_l of the input tokens that enters each layer l.

Tokens only ever leave: r is non-increasing, r_0 = 1 (the first layer sees everything), and the layers
before `first_layer` keep everything too. With f = first_layer and n layers:

    none      r_l = 1
    linear    r_l = 1 - (1 - final_keep) * (l - f + 1) / (n - f)     for l >= f      (the paper's)
    cosine    r_l = final_keep + (1 - final_keep) * (1 + cos(pi x)) / 2,  x = (l - f + 1) / (n - f)
    constant  r_l = final_keep                                          for l >= f
    step      `stages` equal groups of layers from f on, stepping from 1 down to final_keep
    truncate  r_l = final_keep for every layer, layer 0 included: the dense model reading only the last
              tokens of its input (the baseline to clear at equal FLOPs; no criterion)

so that linear, cosine and step reach final_keep at the last layer. With linear to 0.1 from layer 1,
the mean keep ratio is 0.55. Layer l computes the criterion on its own tokens and keeps the top
ceil(r_{l+1} L) of them for layer l + 1.
"""

from __future__ import annotations

import math

from simba_cli.errors import UserError

SCHEDULES = ("none", "linear", "cosine", "constant", "step", "truncate")


def keep_ratios(kind: str, final_keep: float, n_layer: int, first_layer: int = 1, stages: int = 4) -> list[float]:
    """r_l for l = 0 .. n_layer - 1 (the arguments are checked by `PruneConfig`)."""
    if kind == "none":
        return [1.0] * n_layer
    if kind == "truncate":
        return [final_keep] * n_layer
    if n_layer == 1:
        return [1.0] * n_layer
    f = first_layer
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
        if kind == "linear":
            r = 1 - (1 - final_keep) * x
        elif kind == "cosine":
            r = final_keep + (1 - final_keep) * 0.5 * (1 + math.cos(math.pi * x))
        elif kind == "constant":
            r = final_keep
        else:  # step: stage s of `stages` keeps 1 - (1 - final_keep) * (s + 1) / stages
            stage = min(stages - 1, (layer - f) * stages // span)
            if span < stages:  # fewer layers than stages: each its own step, the last one at final_keep
                stage = math.ceil((layer - f + 1) * stages / span) - 1
            r = 1 - (1 - final_keep) * (stage + 1) / stages
        ratios.append(r)
    return ratios
