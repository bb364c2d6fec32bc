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
from simba_cli.models.mamba2 import Mamba2Config, Mamba2LM
from simba_cli.outdir import atomic_directory

HF_EMBED, OUR_EMBED = "backbone.embeddings.weight", "backbone.embedding.weight"


def read_mamba2_config(directory: Path) -> Mamba2Config:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: a Mamba-2 checkpoint directory needs config.json and model.safetensors")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-download or re-save it") from e
    if not isinstance(raw, dict) or raw.get("model_type") != "mamba2":
        found = raw.get("model_type") if isinstance(raw, dict) else None
        raise UserError(f"{path} has model_type {found!r}, not 'mamba2'; point to a Mamba2ForCausalLM checkpoint")
    return Mamba2Config.from_hf(raw)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{index} is not a valid weight index ({type(e).__name__}); re-download or re-save "
                            f"the model") from e
        absent = [s for s in shards if not (directory / s).is_file()]
        if absent:
            raise UserError(f"{index} names weight files that are missing: {_short(absent)}; re-download or "
                            f"re-save the model")
        return [directory / s for s in shards]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise UserError(f"no weights in {directory}: expected model.safetensors beside config.json; re-download or "
                    f"re-save the model")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise UserError(f"cannot read {path} (truncated or corrupt? {type(e).__name__}); re-download or re-save it") \
            from e


def _short(keys: list[str], n: int = 4) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_mamba2(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Mamba2LM:
    """A Mamba2LM from a `Mamba2ForCausalLM.save_pretrained` directory; a one-line UserError when it does not fit."""
    directory = Path(directory)
    cfg = read_mamba2_config(directory)
    files = _weight_files(directory)
    state = {}
    for f in files:
        state.update(_read_weights(f))
    if HF_EMBED in state:
        state[OUR_EMBED] = state.pop(HF_EMBED)
    with torch.device("meta"):  # no memory and no init: every tensor comes from the checkpoint
        model = Mamba2LM(cfg)
    expected = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    where = f"{directory}/{', '.join(f.name for f in files)}"
    if missing or unexpected:
        raise UserError(f"{where} does not fit its config.json: missing keys {_short(missing)}, unexpected keys "
                        f"{_short(unexpected)}")
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise UserError(f"{where} does not fit its config.json: shape mismatch {_short(bad)}")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    return model


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
