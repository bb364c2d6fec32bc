"""The zoo: tiny Mamba models trained by the project's own recipes, shipped inside the package.

Each model is a directory under `simba_cli/zoo/` in Hugging Face format (config.json,
model.safetensors, tokenizer files) plus its recipe (recipe.yaml), training log (train_log.jsonl) and
measurements (metrics.json: parameters, FLOPs per token, held-out perplexity, training time).
"""

from __future__ import annotations

import json
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"


def names() -> list[str]:
    """Zoo model names, smallest first (by FLOPs per token)."""
    found = [p for p in ZOO_DIR.glob("*/config.json")]
    return [p.parent.name for p in sorted(found, key=lambda p: _metrics(p.parent).get("flops_per_token", 0))]


def path(name: str) -> Path | None:
    d = ZOO_DIR / name
    return d if (d / "config.json").is_file() else None


def _metrics(directory: Path) -> dict:
    f = directory / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else {}


CARD = ("params", "flops_per_token", "ppl_ctx128", "ppl_ctx1024", "passkey_acc", "passkey_by_depth",
        "val_ppl", "train_time_s", "train_seq_len")


def info(name: str) -> dict:
    """A model's card: its size, FLOPs per token, held-out perplexity with 128 and 1024 tokens of context,
    pass-key accuracy (dense, at its training length, every depth), and how it was trained (metrics.json,
    measured by `simba_cli.eval.zoocard` after training; absent where not measured)."""
    d = path(name)
    if d is None:
        return {}
    m = _metrics(d)
    card = {"params": m.get("parameters"), "train_seq_len": m.get("val_seq_len"), **m}
    return {"name": name, **{k: card.get(k) for k in CARD}, **m}
