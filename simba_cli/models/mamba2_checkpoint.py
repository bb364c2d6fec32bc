"""Read and write a Mamba2LM as Hugging Face `Mamba2ForCausalLM` files.

    config.json with model_type "mamba2", and model.safetensors (or a sharded model.safetensors.index.json)

Parameter names are transformers' but for the embedding: `backbone.embeddings` there, `backbone.embedding`
here (as mamba-ssm and the Mamba-1 model spell it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from simba_cli.errors import UserError
from simba_cli.models.checkpoint import HF_EMBED, OUR_EMBED, fill, read_config_json
from simba_cli.models.mamba2 import Mamba2Config, Mamba2LM
from simba_cli.outdir import atomic_directory


def read_mamba2_config(directory: Path) -> Mamba2Config:
    path = Path(directory) / "config.json"
    raw = read_config_json(directory)
    if raw.get("model_type") != "mamba2":
        found = raw.get("model_type")
        raise UserError(f"{path} has model_type {found!r}, not 'mamba2'; point to a Mamba2ForCausalLM checkpoint")
    return Mamba2Config.from_hf(raw)


def load_mamba2(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Mamba2LM:
    """A Mamba2LM from a `Mamba2ForCausalLM.save_pretrained` directory; a one-line UserError when it does not fit."""
    directory = Path(directory)
    cfg = read_mamba2_config(directory)
    with torch.device("meta"):  # no memory and no init: every tensor comes from the checkpoint
        model = Mamba2LM(cfg)
    return fill(model, directory, dtype)


def save_mamba2(model: Mamba2LM, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` as Hugging Face `Mamba2ForCausalLM` files, atomically (a temp dir renamed at the end)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise UserError(f"{directory} already exists; choose another path or pass --overwrite")
    with atomic_directory(directory) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        state[HF_EMBED] = state.pop(OUR_EMBED)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf(), indent=2) + "\n")
    return directory
