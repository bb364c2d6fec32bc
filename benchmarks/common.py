"""Shared by the benchmarks: timing side by side, and writing results as JSON."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def write(name: str, figures: dict) -> Path:
    from simba_cli.provenance import provenance

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {**figures, "machine": {"cpu": platform.processor() or platform.machine(),
                                   "threads": torch.get_num_threads()}, "provenance": provenance()}
    path.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"wrote {path}")
    return path
