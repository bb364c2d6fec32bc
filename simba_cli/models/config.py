"""The Mamba-1 architecture config, and its two on-disk spellings (mamba-ssm and Hugging Face).

Glossary (code name -> paper symbol):
    bcdt_rms           Falcon-Mamba: weightless RMS norms on dt_low, B and C before the scan
    d_model   d        width of the residual stream
    n_layer   n        number of blocks
    d_inner   D        channels of the SSM: expand * d unless a config says otherwise (HF's intermediate_size)
    d_state   N        state size per channel
    dt_rank   R        rank of the dt projection
    d_conv    k        width of the causal depthwise convolution
    vocab_size V       padded vocabulary (rows of the embedding and the LM head)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from simba_cli.errors import UserError

# mamba-ssm's MambaConfig has no norm epsilon: its models always build their norms with this one
MAMBA_SSM_NORM_EPS = 1e-5


def check_mamba_ssm_norm_eps(eps: float):
    """mamba-ssm's config.json cannot say another norm epsilon: refuse to write one it would not honour."""
    if eps != MAMBA_SSM_NORM_EPS:
        raise UserError(f"mamba-ssm's config.json cannot hold norm epsilon {eps:g} (its norms always use 1e-5); "
                        f"save this model in hf format")


@dataclass(frozen=True)
class MambaConfig:
    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    expand: int = 2
    d_inner: int = 0  # 0 means expand * d_model
    d_conv: int = 4
    dt_rank: int = 0  # 0 means ceil(d_model / 16), mamba-ssm's "auto"
    conv_bias: bool = True
    bias: bool = False
    rms_norm: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    bcdt_rms: bool = False  # Falcon-Mamba (FalconMambaForCausalLM)
    mixer_rms_eps: float = 1e-6

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "expand", "d_inner", "d_conv", "dt_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0 or \
                    (value == 0 and name not in ("d_inner", "dt_rank")):
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.d_inner == 0:
            object.__setattr__(self, "d_inner", self.expand * self.d_model)
        if self.dt_rank == 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))

    def to_dict(self) -> dict:
        return asdict(self)

    # --- mamba-ssm's config.json (state-spaces/mamba-*) -------------------------------------
    @classmethod
    def from_mamba_ssm(cls, cfg: dict) -> MambaConfig:
        ssm = dict(cfg.get("ssm_cfg") or {})
        layer = ssm.pop("layer", "Mamba1")
        if layer != "Mamba1" or cfg.get("d_intermediate", 0):
            raise UserError(
                f"only Mamba-1 and Mamba-2 checkpoints are supported (this config has layer={layer!r}, "
                f"d_intermediate={cfg.get('d_intermediate', 0)}); use a state-spaces/mamba-* or mamba2-* model"
            )
        vocab = _pad_vocab(cfg["vocab_size"], cfg.get("pad_vocab_size_multiple", 8))
        return cls(
            d_model=cfg["d_model"],
            n_layer=cfg["n_layer"],
            vocab_size=vocab,
            d_state=ssm.get("d_state", 16),
            expand=ssm.get("expand", 2),
            d_conv=ssm.get("d_conv", 4),
            dt_rank=_rank(ssm.get("dt_rank"), "ssm_cfg.dt_rank"),
            conv_bias=ssm.get("conv_bias", True),
            bias=ssm.get("bias", False),
            rms_norm=cfg.get("rms_norm", True),
            norm_eps=cfg.get("norm_epsilon", 1e-5),
            residual_in_fp32=cfg.get("residual_in_fp32", True),
            tie_embeddings=cfg.get("tie_embeddings", True),
        )

    def to_mamba_ssm(self) -> dict:
        if self.bcdt_rms:
            raise UserError("mamba-ssm's config.json has no Falcon-Mamba variant (norms on dt, B, C); save this "
                            "model in hf format")
        check_mamba_ssm_norm_eps(self.norm_eps)
        if self.d_inner != self.expand * self.d_model:
            raise UserError(f"mamba-ssm's config.json cannot hold d_inner {self.d_inner} (it is always expand × "
                            f"d_model = {self.expand * self.d_model}); save this model in hf format")
        return {
            "d_model": self.d_model,
            "d_intermediate": 0,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": {
                "layer": "Mamba1",
                "d_state": self.d_state,
                "d_conv": self.d_conv,
                "expand": self.expand,
                "dt_rank": self.dt_rank,
                "conv_bias": self.conv_bias,
                "bias": self.bias,
            },
            "rms_norm": self.rms_norm,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": 8,
            "tie_embeddings": self.tie_embeddings,
        }

    # --- Hugging Face MambaForCausalLM's config.json (*-hf) ---------------------------------
    @classmethod
    def from_hf(cls, cfg: dict) -> MambaConfig:
        return cls(
            d_model=cfg["hidden_size"],
            n_layer=cfg["num_hidden_layers"],
            vocab_size=cfg["vocab_size"],
            d_state=cfg.get("state_size", 16),
            expand=cfg.get("expand", 2),
            d_inner=cfg.get("intermediate_size") or 0,
            d_conv=cfg.get("conv_kernel", 4),
            dt_rank=_rank(cfg.get("time_step_rank"), "time_step_rank"),
            conv_bias=cfg.get("use_conv_bias", True),
            bias=cfg.get("use_bias", False),
            rms_norm=True,  # MambaForCausalLM always uses RMSNorm
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            residual_in_fp32=cfg.get("residual_in_fp32", True),
            tie_embeddings=cfg.get("tie_word_embeddings", True),
            bcdt_rms=cfg.get("model_type") == "falcon_mamba",
            mixer_rms_eps=cfg.get("mixer_rms_eps", 1e-6),
        )

    def to_hf(self) -> dict:
        if not self.rms_norm:
            raise UserError("MambaForCausalLM has no LayerNorm variant; save this model in mamba-ssm format")
        falcon = {"architectures": ["FalconMambaForCausalLM"], "model_type": "falcon_mamba",
                  "mixer_rms_eps": self.mixer_rms_eps} if self.bcdt_rms else {}
        return {
            "architectures": ["MambaForCausalLM"],
            "model_type": "mamba",
            **falcon,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.vocab_size,
            "state_size": self.d_state,
            "expand": self.expand,
            "intermediate_size": self.d_inner,
            "conv_kernel": self.d_conv,
            "time_step_rank": self.dt_rank,
            "use_bias": self.bias,
            "use_conv_bias": self.conv_bias,
            "layer_norm_epsilon": self.norm_eps,
            "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
        }


def _rank(value, key: str) -> int:
    """A dt rank as configs spell it: a number, or "auto" (or absent) for ceil(d_model / 16), written as 0."""
    if value is None or value == "auto":
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise UserError(f"model config: {key} must be a positive integer or \"auto\", got {value!r}; fix config.json")


def _pad_vocab(vocab: int, multiple: int) -> int:
    return vocab if vocab % multiple == 0 else vocab + multiple - vocab % multiple


# The official Mamba-1 family (state-spaces/mamba-*), for FLOPs tables without downloading weights.
OFFICIAL = {
    "mamba-130m": MambaConfig(d_model=768, n_layer=24, vocab_size=50280),
    "mamba-370m": MambaConfig(d_model=1024, n_layer=48, vocab_size=50280),
    "mamba-790m": MambaConfig(d_model=1536, n_layer=48, vocab_size=50280),
    "mamba-1.4b": MambaConfig(d_model=2048, n_layer=48, vocab_size=50280),
    "mamba-2.8b": MambaConfig(d_model=2560, n_layer=64, vocab_size=50280),
}


def official_config(name: str) -> MambaConfig | None:
    """The config of an official size given as `mamba-130m`, `state-spaces/mamba-130m` or `...-hf`."""
    key = name.split("/")[-1].removesuffix("-hf")
    return OFFICIAL.get(key)
