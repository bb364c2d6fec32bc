"""The pruned-model artifact: a directory with `simba.yaml`, loadable wherever a model is expected.

    simba.yaml
      simba_artifact: 1
      base: state-spaces/mamba-370m      # a hub id, a zoo name, an absolute directory, or "." when the
                                         # weights sit beside this file (a model fine-tuned with pruning)
      prune: {schedule: linear, final_keep: 0.1, first_layer: 1, stages: 4, criterion: simba, mode: exit}
      model: {d_model: ..., n_layer: ...}          # the base model's architecture
      keep_ratios: [1.0, 0.96, ...]                # tokens entering each layer, as a fraction of the input
      mean_keep: 0.55                              # their mean
      flops: {seq_len: 2048, dense: ..., pruned: ..., ratio: ..., per_layer: [...]}   # analytic
      provenance: {versions, git_commit, command}

The artifact stores no weights of its own (unless base is "."): it is a recipe for pruning a model.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from simba_cli.errors import UserError
from simba_cli.outdir import check_not_file, write_atomic
from simba_cli.provenance import provenance
from simba_cli.simba.flops import Config, analytic
from simba_cli.simba.settings import PruneConfig, check_seq_len

FILENAME = "simba.yaml"
FORMAT_VERSION = 1


def is_artifact(ref: str | Path) -> bool:
    return (Path(ref).expanduser() / FILENAME).is_file()


def describe_flops(cfg: Config, config: PruneConfig, seq_len: int) -> dict:
    """The analytic FLOPs of one sequence of `seq_len` tokens, dense and pruned: logits at every position in
    exit mode, at the last one in protect mode (as `flops-report --head last`)."""
    check_seq_len(config, cfg.n_layer, seq_len)
    heads = seq_len if config.mode == "exit" else 1
    dense = analytic(cfg, seq_len, head_positions=heads)
    pruned = analytic(cfg, seq_len, config.keep_ratios(cfg.n_layer), config.criterion, head_positions=heads)
    return {
        "seq_len": seq_len,
        "logits_at": "all" if heads == seq_len else "last",
        "dense": dense.total,
        "pruned": pruned.total,
        "ratio": pruned.total / dense.total,
        "per_layer": [{"layer": i, "tokens_in": t, "flops": f, "criterion_flops": c}
                      for i, (t, f, c) in enumerate(zip(pruned.tokens_in, pruned.layer, pruned.criterion))],
    }


def _base_reference(ref: str) -> str:
    """What to record as the base model: an absolute path for local directories, else the name."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.is_dir() else ref


def write_artifact(target: str | Path, base: str, config: PruneConfig, cfg: Config, seq_len: int = 2048,
                   overwrite: bool = False, **extra) -> Path:
    """Write `simba.yaml` into `target` (created if needed); the file is written whole or not at all."""
    target = Path(target)
    check_not_file(target)
    path = target / FILENAME
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it, or choose another --out")
    text = artifact_text(base, config, cfg, seq_len, **extra)
    target.mkdir(parents=True, exist_ok=True)  # only now: a setting found wrong above leaves nothing behind
    write_atomic(path, text)
    return path


def artifact_text(base: str, config: PruneConfig, cfg: Config, seq_len: int = 2048, **extra) -> str:
    """The YAML of simba.yaml: the base, the prune settings, the model, the keep ratios and FLOPs, provenance."""
    body = {
        "simba_artifact": FORMAT_VERSION,
        "base": base if base == "." else _base_reference(base),
        "prune": config.to_dict(),
        "model": cfg.to_dict(),
        "keep_ratios": [round(r, 6) for r in config.keep_ratios(cfg.n_layer)],
        "mean_keep": round(config.mean_keep(cfg.n_layer), 6),
        "flops": describe_flops(cfg, config, seq_len),
        "provenance": provenance(**extra),
    }
    return yaml.safe_dump(body, sort_keys=False)


def read_artifact(directory: str | Path) -> tuple[str, PruneConfig, dict]:
    """(base reference, resolved against the artifact directory; the prune config; the whole file)."""
    directory = Path(directory).expanduser()
    path = directory / FILENAME
    try:
        body = yaml.safe_load(path.read_text())
        if not isinstance(body, dict) or body.get("simba_artifact") != FORMAT_VERSION:
            raise ValueError("not a simba artifact, version 1")
        config = PruneConfig.from_mapping(body["prune"], "prune")
        base = str(body["base"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError, UserError) as e:
        raise UserError(f"{path} is not a valid simba artifact ({e}); recreate it with `simba prune`") from e
    if base == ".":
        base = str(directory)
    return base, config, body


def prune_model(model: str, out: str | Path, config: PruneConfig, seq_len: int = 2048,
                overwrite: bool = False) -> dict:
    """`simba prune`: check that the model loads (its weights are there, readable and fit its config), then
    write the artifact, with the FLOPs of the loaded model's architecture. Returns what was written."""
    import torch

    from simba_cli.models.loading import load_model
    from simba_cli.outdir import check_out

    check_out(Path(out), FILENAME, "prune", overwrite=overwrite, resumable=False)  # no writing among others' files
    if is_artifact(model):  # re-pruning an artifact prunes its base
        model, _, _ = read_artifact(model)
    loaded = load_model(model, device="cpu", dtype=torch.float32, with_tokenizer=False)
    cfg = loaded.model.cfg
    del loaded
    path = write_artifact(out, model, config, cfg, seq_len, overwrite=overwrite)
    return yaml.safe_load(path.read_text())


def load_any(ref: str, device="cpu", dtype=None, tokenizer: str | None = None, with_tokenizer: bool = True):
    """Load a model or a pruned artifact: (LoadedModel, PruneConfig or None)."""
    import torch

    from simba_cli.models.loading import load_model

    config = None
    if is_artifact(ref):
        ref, config, _ = read_artifact(ref)
    return load_model(ref, device=device, dtype=dtype or torch.float32, tokenizer=tokenizer,
                      with_tokenizer=with_tokenizer), config
