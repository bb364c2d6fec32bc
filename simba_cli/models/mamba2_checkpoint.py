"""Read and write a Mamba2LM as Hugging Face `Mamba2ForCausalLM` files.

    config.json with model_type "mamba2", and model.safetensors (or a sharded model.safetensors.index.json)

Parameter names are transformers' but for the embedding: `backbone.embeddings` there, `backbone.embedding`
here (as mamba-ssm and the Mamba-1 model spell it). The general loader (`models.checkpoint.load_checkpoint`)
reads these and mamba-ssm's state-spaces/mamba2-* files too; this module insists on the Hugging Face format.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from simba_cli.errors import UserError
from simba_cli.models.checkpoint import empty_model, fill, read_config_json, save_checkpoint
from simba_cli.models.mamba2 import Mamba2Config, Mamba2LM


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
    return fill(empty_model(read_mamba2_config(directory)), directory, dtype)


def save_mamba2(model: Mamba2LM, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` as Hugging Face `Mamba2ForCausalLM` files, atomically (a temp dir renamed at the end)."""
    return save_checkpoint(model, directory, fmt="hf", overwrite=overwrite)
