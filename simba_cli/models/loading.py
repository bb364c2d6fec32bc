"""Load a model by reference (directory, zoo name or hub id) with its tokenizer; Mamba-1 or Mamba-2, as its
config.json says (`models.checkpoint.read_config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from simba_cli.errors import UserError
from simba_cli.models import hub
from simba_cli.models.checkpoint import load_checkpoint, read_config
from simba_cli.models.mamba import BlockLM
from simba_cli.models.tokenizer import load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None, fall_back: bool = False) -> torch.device:
    """None or "auto": CUDA when available, else the CPU. A CUDA device on a machine without one is a
    one-line error, or the CPU with a warning when `fall_back` (lm-eval asks for cuda:0 by default)."""
    name = "auto" if device is None else str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device("cuda" if name == "gpu" else name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):  # torch knows mps, xpu, meta...; the kernels and tests cover these two
        raise UserError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        if fall_back:
            import warnings

            warnings.warn(f"device {name} asked for, but this torch has no CUDA device: running on the CPU",
                          stacklevel=3)
            return torch.device("cpu")
        raise UserError(f"device {name} asked for, but this torch has no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {name} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


@dataclass
class LoadedModel:
    model: BlockLM  # MambaLM or Mamba2LM, as config.json says
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
