"""Checkpoint formats: read and write a Mamba-1 or Mamba-2 LM as mamba-ssm or Hugging Face files.

    mamba-ssm (state-spaces/mamba-*, state-spaces/mamba2-*):
        config.json with d_model/n_layer/ssm_cfg (ssm_cfg.layer "Mamba2" for Mamba-2), pytorch_model.bin
    Hugging Face (*-hf, MambaForCausalLM, FalconMambaForCausalLM, Mamba2ForCausalLM):
        config.json with model_type "mamba", "falcon_mamba" or "mamba2", model.safetensors
        (or pytorch_model.bin, or a sharded *.index.json)

The family comes from config.json alone (`read_config`); the model class from the config's type.

Parameter names are the same in both but for the embedding: `backbone.embedding` (mamba-ssm, and
this package) vs `backbone.embeddings` (transformers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from simba_cli.errors import UserError
from simba_cli.models.config import MambaConfig
from simba_cli.models.mamba import BlockLM, MambaLM
from simba_cli.models.mamba2 import Mamba2Config, Mamba2LM
from simba_cli.outdir import atomic_directory

HF_EMBED, OUR_EMBED = "backbone.embeddings.weight", "backbone.embedding.weight"


def read_config_json(directory: Path) -> dict:
    """A checkpoint directory's config.json as a dict; one-line errors when it is missing or not JSON."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} is missing: a Mamba checkpoint directory needs config.json and its weights")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-download or re-save it") from e
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a JSON object; re-download or re-save it")
    return raw


def read_config(directory: Path) -> tuple[MambaConfig | Mamba2Config, str]:
    """The model config of a checkpoint directory (its family's config type), and its format: 'mamba_ssm' or 'hf'."""
    path = directory / "config.json"
    raw = read_config_json(directory)
    ssm_cfg = raw.get("ssm_cfg")
    layer = ssm_cfg.get("layer") if isinstance(ssm_cfg, dict) else None  # mamba-ssm names the family here
    try:
        if raw.get("model_type") == "mamba2":
            return Mamba2Config.from_hf(raw), "hf"
        if raw.get("model_type") in ("mamba", "falcon_mamba") or "hidden_size" in raw:
            return MambaConfig.from_hf(raw), "hf"
        if "d_model" in raw and layer == "Mamba2":
            return Mamba2Config.from_mamba_ssm(raw), "mamba_ssm"
        if "d_model" in raw:
            return MambaConfig.from_mamba_ssm(raw), "mamba_ssm"
    except KeyError as e:
        raise UserError(f"{path} lacks the key {e.args[0]!r}; is this a Mamba config?") from e
    raise UserError(f"{path} is neither a mamba-ssm nor a Hugging Face Mamba config (no d_model or hidden_size)")


def family(cfg: MambaConfig | Mamba2Config) -> str:
    """The family of a model config, as recipes and `simba zoo` name it: mamba, falcon-mamba or mamba2."""
    if isinstance(cfg, Mamba2Config):
        return "mamba2"
    return "falcon-mamba" if cfg.bcdt_rms else "mamba"


def empty_model(cfg: MambaConfig | Mamba2Config) -> BlockLM:
    """The LM of `cfg`'s family on the meta device: no memory and no init, every tensor to come from a checkpoint."""
    with torch.device("meta"):
        return Mamba2LM(cfg) if isinstance(cfg, Mamba2Config) else MambaLM(cfg, init=False)


def _weight_files(directory: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            try:
                shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{directory / index} is not a valid weight index ({type(e).__name__}); "
                                f"re-download or re-save the model") from e
            absent = [s for s in shards if not (directory / s).is_file()]
            if absent:
                raise UserError(f"{directory / index} names weight files that are missing: {_short(absent)}; "
                                f"re-download or re-save the model")
            return [directory / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise UserError(f"no weights in {directory}: expected model.safetensors or pytorch_model.bin beside "
                    f"config.json; re-download or re-save the model")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} (truncated or corrupt? {type(e).__name__}); re-download or re-save it") \
            from e


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in _weight_files(directory):
        state.update(_read_weights(f))
    if HF_EMBED in state:
        state[OUR_EMBED] = state.pop(HF_EMBED)
    return state


def load_checkpoint(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> BlockLM:
    """A MambaLM or Mamba2LM (as config.json says) from a checkpoint directory in either format; a one-line
    UserError when it does not fit."""
    directory = Path(directory)
    cfg, _ = read_config(directory)
    return fill(empty_model(cfg), directory, dtype)


def fill(model, directory: Path, dtype: torch.dtype):
    """Load `directory`'s weights into `model` (built on the meta device, any family with `cfg.tie_embeddings`
    and `tie_weights()`); a one-line UserError naming the keys or shapes that do not fit its config."""
    state = load_state_dict(directory)
    expected = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    files = ", ".join(f.name for f in _weight_files(directory))
    if missing or unexpected:
        raise UserError(f"{directory}/{files} does not fit its config.json: missing keys {_short(missing)}, "
                        f"unexpected keys {_short(unexpected)}")
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise UserError(f"{directory}/{files} does not fit its config.json: shape mismatch {_short(bad)}")
    for k in list(state):  # one tensor at a time, each source freed as it is replaced: a 7B bf16 checkpoint read as
        state[k] = state[k].to(dtype)  # float32 peaks at the float32 model, not at both copies together
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model


def _short(keys: list[str], n: int = 4) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def save_checkpoint(model: BlockLM, directory: str | os.PathLike, fmt: str = "hf", tokenizer=None,
                    extra_files: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write model (and tokenizer) in `fmt` ('hf' or 'mamba_ssm'), atomically: a temp dir renamed at the end."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise UserError(f"{directory} already exists; choose another path or pass --overwrite")
    if fmt not in ("hf", "mamba_ssm"):
        raise UserError(f"unknown checkpoint format {fmt!r}; use hf or mamba_ssm")
    with atomic_directory(directory) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        if fmt == "hf":
            from safetensors.torch import save_file

            state[HF_EMBED] = state.pop(OUR_EMBED)
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config = model.cfg.to_hf()
        else:
            torch.save(state, tmp / "pytorch_model.bin")
            config = model.cfg.to_mamba_ssm()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return directory
