"""The zoo: tiny Mamba models trained by the project's own recipes, shipped inside the package.

Each model is a directory under `simba_cli/zoo/` in Hugging Face format (config.json,
model.safetensors, tokenizer files) plus its recipe (recipe.yaml), training log (train_log.jsonl) and
measurements (metrics.json: parameters, FLOPs per token, held-out perplexity, training time). Its family
(mamba: Mamba-1, the ladder `simba compare` reads; mamba2: Mamba-2) is what its config.json says.
"""

from __future__ import annotations

import json
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"


def names(family: str | None = None) -> list[str]:
    """Zoo model names, smallest first (by FLOPs per token); only `family`'s (mamba, mamba2) when given."""
    found = [p.parent for p in ZOO_DIR.glob("*/config.json")]
    found = [d for d in found if family is None or family_of(d) == family]
    return [d.name for d in sorted(found, key=lambda d: _metrics(d).get("flops_per_token", 0))]


def family_of(directory: Path) -> str:
    """mamba or mamba2 (or falcon-mamba): what the model's config.json says."""
    from simba_cli.models.checkpoint import family, read_config

    return family(read_config(directory)[0])


def path(name: str) -> Path | None:
    d = ZOO_DIR / name
    return d if (d / "config.json").is_file() else None


def _metrics(directory: Path) -> dict:
    f = directory / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else {}


CARD = ("family", "params", "flops_per_token", "ppl_ctx128", "ppl_ctx1024", "context_gain", "context_gain_se",
        "passkey_acc", "passkey_by_depth", "val_ppl", "train_time_s", "train_seq_len")


def info(name: str) -> dict:
    """A model's card: its family (from config.json), size, FLOPs per token, held-out perplexity with 128 and
    1024 tokens of context and what the longer context gains, pass-key accuracy (dense, at its training length,
    every depth), and how it was trained (metrics.json, measured by `simba_cli.eval.zoocard` after training;
    absent where not measured)."""
    d = path(name)
    if d is None:
        return {}
    m = _metrics(d)
    card = {"params": m.get("parameters"), "train_seq_len": m.get("val_seq_len"), **m, "family": family_of(d)}
    return {"name": name, **{k: card.get(k) for k in CARD}, **m, "family": card["family"]}
