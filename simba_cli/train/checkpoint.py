"""Training checkpoints: one file, replaced atomically, so an interruption never leaves a broken one.

It holds what an exact resume needs: model, optimizer, LR scheduler, step, the data sampler's generator
and the global RNG state.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from simba_cli.errors import UserError

CHECKPOINT = "checkpoint.pt"


def save(run_dir: Path, state: dict) -> Path:
    path = run_dir / CHECKPOINT
    tmp = path.with_name(f".{CHECKPOINT}.tmp")  # one name: a write killed midway is replaced by the next
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power loss cannot leave an empty checkpoint
    os.replace(tmp, path)  # atomic on POSIX: the old checkpoint stays until the new one is complete
    return path


def load(run_dir: Path) -> dict:
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist; run without --resume to start")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); start again with --overwrite") from e
