"""Load a model by reference (directory, zoo name or hub id) with its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from simba_cli.models import hub
from simba_cli.models.checkpoint import load_checkpoint, read_config
from simba_cli.models.mamba import MambaLM
from simba_cli.models.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: MambaLM
    tokenizer: object | None
    ref: str  # what the user asked for
    directory: Path  # where the files are
    format: str  # 'hf' or 'mamba_ssm'


def load_model(ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               tokenizer: str | None = None, with_tokenizer: bool = True) -> LoadedModel:
    directory = hub.resolve(ref)
    _, fmt = read_config(directory)
    model = load_checkpoint(directory, dtype=dtype).to(device).eval()
    tok = load_tokenizer(directory, tokenizer) if with_tokenizer else None
    return LoadedModel(model, tok, ref, directory, fmt)
