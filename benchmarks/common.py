"""Shared by the benchmarks: timing side by side, and writing results as JSON."""

from __future__ import annotations

import json
import platform
import statistics
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


def medians_side_by_side(fns: dict, repeats: int) -> dict[str, float]:
    """The median time of each of `fns` (name -> callable) over `repeats` rounds, in seconds; the functions take
    turns within each round, so that all of them see the same machine."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(best_of(fn, 1))
    return {name: statistics.median(ts) for name, ts in times.items()}


def write(name: str, figures: dict, update: bool = False) -> Path:
    """results/<name>.json with `figures`; `update` keeps the figures of an earlier run that this one did not
    measure (a run of some of a benchmark's keys)."""
    from simba_cli.provenance import provenance

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    kept = {}
    if update and path.is_file():
        old = json.loads(path.read_text())
        earlier = {k: v for k, v in old.items() if k not in ("machine", "provenance", "kept_from")}
        # the figures this run did not measure keep the provenance of the run that did
        old_kept = old.get("kept_from", [])
        in_old_kept = {k for r in old_kept for k in r["keys"]}
        runs = old_kept + [{"keys": sorted(set(earlier) - in_old_kept), "provenance": old.get("provenance")}]
        for r in runs:
            r["keys"] = sorted(set(r["keys"]) - set(figures))
        kept = {"kept_from": [r for r in runs if r["keys"]]}
        figures = {**earlier, **figures}
    body = {**figures, "machine": {"cpu": platform.processor() or platform.machine(),
                                   "threads": torch.get_num_threads()}, "provenance": provenance(), **kept}
    path.write_text(json.dumps(body, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"wrote {path}")
    return path
