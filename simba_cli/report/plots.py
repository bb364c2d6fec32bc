"""Plots (PNG, matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path):
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def plot_training(log_path: Path, out_path: Path, title: str = ""):
    """Training loss and held-out loss against step, from a train_log.jsonl."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out_path)


def plot_flops_accuracy(rows: list[dict], out_path: Path):
    """One panel per task: the dense models' curve and, per model, Simba (and baselines) against FLOPs."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {m: plt.cm.viridis(i / max(1, len(models) - 1) * 0.85) for i, m in enumerate(models)}
    style = {"simba": ("o", "-"), "recent": ("s", ":"), "random": ("x", "--")}
    for ax, task in zip(axes[0], tasks):
        mine = [r for r in rows if r["task"] == task]
        metric = mine[0].get("metric", "acc")
        dense = sorted((r["flops_per_doc"], r[metric], r["model"]) for r in mine if r["setting"] == "dense")
        ax.plot([d[0] for d in dense], [d[1] for d in dense], "k-", lw=2, label="dense", zorder=3)
        for f, v, m in dense:
            ax.annotate(m, (f, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for m in models:
            for crit, (marker, line) in style.items():
                pts = sorted((r["flops_per_doc"], r[metric]) for r in mine
                             if r["model"] == m and r["criterion"] == crit and r.get(metric) is not None)
                if pts:
                    ax.plot(*zip(*pts), marker=marker, ls=line, color=colors[m], alpha=1 if crit == "simba" else 0.5,
                            label=f"{m} {crit}")
        ax.set_xscale("log")
        if metric in ("perplexity", "word_perplexity"):
            ax.set_yscale("log")
        ax.set_xlabel("measured FLOPs per document")
        ax.set_ylabel(metric + (" (lower is better)" if "perplexity" in metric else ""))
        ax.set_title(task)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("Dense vs Simba-pruned Mamba: accuracy against measured FLOPs")
    _save(fig, out_path)


def plot_ppl_context(rows: list[dict], out_path: Path):
    """Perplexity of the scored tokens against context length, per model and setting."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    models = list(dict.fromkeys(r["model"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lines = ["-", "--", ":", "-."]
    for i, m in enumerate(models):
        color = plt.cm.viridis(i / max(1, len(models) - 1) * 0.85)
        for j, s in enumerate(settings):
            pts = sorted((r["context"], r["ppl"]) for r in rows if r["model"] == m and r["setting"] == s)
            if pts:
                ax.plot(*zip(*pts), marker="o", ls=lines[j % len(lines)], color=color, label=f"{m} {s}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity of the last tokens")
    ax.set_title("Long-context perplexity (PG-19 protocol, held-out plays)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _save(fig, out_path)
