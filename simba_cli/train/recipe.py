"""Training recipes: readable YAML, validated into typed dataclasses, saved beside every run.

    name: zoo-m
    model:            # architecture, to train from scratch (leave out to continue a given model)
      family: mamba   # or mamba2 (SSD); see ModelSpec for each family's keys
      d_model: 128
      n_layer: 8
    tokenizer:        # for a model from scratch: a byte-level BPE trained on the training split
      vocab_size: 2048
    data:
      source: shakespeare          # or a file, a directory, a saved dataset, hf:NAME
      seq_len: 512
      recall:                      # optional: long-range recall documents (data.longrange) from training text
        share: 0.5                 # of the batch's rows
        passkey: 0.5               # relative weights of the two kinds
        mqar: 0.5
        pairs: [4, 8, 16]          # facts per mqar document
        lead_steps: 800            # first, retrieval alone: short recall rows, loss on answers only
        lead_len: 512              # the lead's rows, in tokens
        curriculum_from: 800       # documents short until this step,
        curriculum_steps: 1000     # then facts placed ever further back over these steps
        answer_loss: 1.0           # loss = mean over other tokens + answer_loss * mean over answers
    optim:
      lr: 3.0e-3
      ...
    train:
      steps: 3000
      batch_size: 8                # global batch, split across data-parallel processes
      ...
    prune:            # optional: Simba pruning active during training (simba.settings.PruneConfig)
      schedule: linear
      final_keep: 0.3
      criterion: simba
      mode: exit                   # the loss on every position (through the early exits), or protect:
                                   # on the last train.protect_last positions of each window only

Unknown keys and bad values are one-line errors that name the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from simba_cli.data.longrange import KEYS, RecallMix
from simba_cli.errors import UserError
from simba_cli.simba.settings import PruneConfig
from simba_cli.typed import build, yaml_problem

FAMILIES = ("mamba", "mamba2")
MAMBA2_ONLY = ("head_dim", "n_groups", "chunk_size")  # keys of Mamba2Config that Mamba-1 has no use for


@dataclass
class ModelSpec:
    """The architecture to train from scratch: `family` mamba (Mamba-1, `models.config.MambaConfig`) or mamba2
    (SSD, `models.mamba2_config.Mamba2Config`). Both take d_model, n_layer, d_state, expand and d_conv; mamba2
    also head_dim, n_groups and chunk_size. A key left out takes its family's default (d_state: 16 for mamba,
    128 for mamba2; head_dim 64, n_groups 1, chunk_size 256)."""

    d_model: int
    n_layer: int
    family: str = "mamba"
    d_state: int | None = None
    expand: int = 2
    d_conv: int = 4
    head_dim: int | None = None
    n_groups: int | None = None
    chunk_size: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserError(f"family must be mamba or mamba2, got {self.family!r}")
        if self.family == "mamba":
            given = [k for k in MAMBA2_ONLY if getattr(self, k) is not None]
            if given:
                raise UserError(f"{given[0]} is a Mamba-2 key; set family: mamba2, or leave {given[0]} out")
        defaults = {"d_state": 16} if self.family == "mamba" else \
            {"d_state": 128, "head_dim": 64, "n_groups": 1, "chunk_size": 256}
        for key, value in defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key in ("d_model", "n_layer", "d_state", "expand", "d_conv", *MAMBA2_ONLY):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"{key} must be a positive integer, got {value!r}")
        if self.family == "mamba2":
            d_inner = self.expand * self.d_model
            if d_inner % self.head_dim:
                raise UserError(f"head_dim {self.head_dim} does not divide expand × d_model = {d_inner}")
            if (d_inner // self.head_dim) % self.n_groups:
                raise UserError(f"n_groups {self.n_groups} does not divide the {d_inner // self.head_dim} heads "
                                f"(expand × d_model / head_dim)")

    def to_dict(self) -> dict:
        """The keys that apply to the family (a Mamba-1 spec has no Mamba-2 keys)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {"family": d.pop("family"), **d}


@dataclass
class TokenizerSpec:
    vocab_size: int = 2048


@dataclass
class DataSpec:
    source: str = "shakespeare"
    seq_len: int = 512
    text_field: str = "text"
    val_tokens: int = 65536  # held-out tokens scored at each evaluation during training
    recall: RecallMix | None = None  # long-range recall documents mixed in (data.longrange), from training text


@dataclass
class OptimSpec:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0


@dataclass
class TrainSpec:
    steps: int = 1000
    batch_size: int = 8
    seed: int = 0
    eval_every: int = 250
    checkpoint_every: int = 250
    log_every: int = 10
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32, bf16
    dropout: float = 0.0  # training only: on the embeddings and every mixer's output (not saved with the model)
    protect_last: int = 64  # with prune.mode protect: the loss is on the last k positions of each window


@dataclass
class Recipe:
    name: str
    model: ModelSpec | None = None
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    prune: PruneConfig | None = None

    def __post_init__(self):
        checks = [
            (self.data.seq_len >= 2, "data.seq_len must be at least 2"),
            (self.train.steps >= 1, "train.steps must be at least 1"),
            (self.train.batch_size >= 1, "train.batch_size must be at least 1"),
            (self.optim.lr > 0, "optim.lr must be positive"),
            (0 <= self.optim.min_lr <= self.optim.lr, "optim.min_lr must be in [0, optim.lr]"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
            (self.optim.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)"),
            (self.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (self.data.val_tokens >= 1, "data.val_tokens must be at least 1"),
            (all(0 <= b < 1 for b in self.optim.betas), "optim.betas must be in [0, 1)"),
            (0 <= self.train.dropout < 1, "train.dropout must be in [0, 1)"),
            (self.train.precision in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16"),
            (self.tokenizer.vocab_size >= 300, "tokenizer.vocab_size must be at least 300 (256 bytes + merges)"),
            (min(self.train.eval_every, self.train.checkpoint_every, self.train.log_every) >= 1,
             "train.eval_every, checkpoint_every and log_every must be at least 1"),
            (self.train.protect_last >= 1, "train.protect_last must be at least 1"),
        ]
        if (mix := self.data.recall) is not None:
            checks += [
                (0 <= mix.share <= 1, "data.recall.share must be in [0, 1]"),
                (mix.passkey >= 0 and mix.mqar >= 0 and mix.passkey + mix.mqar > 0,
                 "data.recall.passkey and .mqar are weights: not negative, not both 0"),
                (bool(mix.pairs) and all(1 <= k <= len(KEYS) for k in mix.pairs),
                 f"data.recall.pairs: numbers in 1..{len(KEYS)} (the distinct keys there are)"),
                (mix.answer_loss >= 0, "data.recall.answer_loss must be >= 0"),
                (min(mix.lead_steps, mix.curriculum_from, mix.curriculum_steps) >= 0,
                 "data.recall.lead_steps, .curriculum_from and .curriculum_steps must be >= 0"),
                (mix.shortest >= 1, "data.recall.shortest must be at least 1"),
                (mix.lead_len >= mix.shortest, "data.recall.lead_len must be at least data.recall.shortest"),
            ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"recipe {self.name!r}: {message}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.model is not None:
            d["model"] = self.model.to_dict()
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def recipe_from_dict(raw: dict, where: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping of sections (name, model, data, ...), got {type(raw).__name__}")
    raw = dict(raw)
    raw.setdefault("name", where)
    return build(Recipe, raw, where)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" in {Path.cwd()}"
        raise UserError(f"recipe {path} does not exist{where}; give --recipe a YAML file (the repository's recipes/ "
                        f"has examples)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not UTF-8 text; give a YAML file (see recipes/)") from None
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {yaml_problem(e)}") from e
    if not raw:
        raise UserError(f"recipe {path} is empty; give at least its data and train sections (see recipes/)")
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)
    return recipe_from_dict(raw, str(path))
