"""The Mamba-2 (SSD) architecture config, and its two on-disk spellings (mamba-ssm and Hugging Face).

Glossary: see `simba_cli.models.mamba2`. The spellings:
    mamba-ssm (state-spaces/mamba2-*):  config.json with d_model, n_layer and ssm_cfg {"layer": "Mamba2", ...},
                                        weights in pytorch_model.bin
    Hugging Face (Mamba2ForCausalLM):   config.json with model_type "mamba2", weights in model.safetensors
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from simba_cli.errors import UserError
from simba_cli.models.config import _pad_vocab, check_mamba_ssm_norm_eps

# mamba-ssm's settings for a plain Mamba-2 LM, the one this package implements.
_PLAIN_MAMBA_SSM = {"d_intermediate": 0, "attn_layer_idx": [], "rms_norm": True, "ssm_cfg.rmsnorm": True,
                    "ssm_cfg.norm_before_gate": False, "ssm_cfg.D_has_hdim": False}


@dataclass(frozen=True)
class Mamba2Config:
    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 128
    expand: int = 2
    head_dim: int = 64
    n_groups: int = 1
    d_conv: int = 4
    chunk_size: int = 256
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    residual_in_fp32: bool = True
    dt_limit: tuple[float, float] = (0.0, math.inf)

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "expand", "head_dim", "n_groups", "d_conv",
                     "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"Mamba-2 config: {name} must be a positive integer, got {value!r}; fix config.json")
        if self.d_inner % self.head_dim:
            raise UserError(f"Mamba-2 config: expand × d_model = {self.d_inner} is not a multiple of head_dim "
                            f"{self.head_dim}; fix config.json")
        if self.n_heads % self.n_groups:
            raise UserError(f"Mamba-2 config: {self.n_heads} heads do not split into n_groups {self.n_groups}; "
                            f"fix config.json")
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    def to_dict(self) -> dict:
        """Plain values only (a list for dt_limit), so that YAML and JSON writers take it as is."""
        return {**asdict(self), "dt_limit": list(self.dt_limit)}

    @classmethod
    def from_hf(cls, cfg: dict) -> Mamba2Config:
        """From the config.json of Hugging Face `Mamba2ForCausalLM` (model_type "mamba2")."""
        try:
            limit = _dt_limit(cfg.get("time_step_limit", (0.0, math.inf)))
            out = cls(
                d_model=cfg["hidden_size"],
                n_layer=cfg["num_hidden_layers"],
                vocab_size=cfg["vocab_size"],
                d_state=cfg.get("state_size", 128),
                expand=cfg.get("expand", 2),
                head_dim=cfg.get("head_dim", 64),
                n_groups=cfg.get("n_groups", 8),
                d_conv=cfg.get("conv_kernel", 4),
                chunk_size=cfg.get("chunk_size", 256),
                conv_bias=cfg.get("use_conv_bias", True),
                bias=cfg.get("use_bias", False),
                norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=cfg.get("tie_word_embeddings", False),
                residual_in_fp32=cfg.get("residual_in_fp32", True),
                dt_limit=limit,
            )
        except KeyError as e:
            raise UserError(f"Mamba-2 config.json lacks the key {e.args[0]!r}; is this a Mamba2ForCausalLM "
                            f"config?") from e
        heads = cfg.get("num_heads", out.n_heads)
        if heads != out.n_heads:
            raise UserError(f"Mamba-2 config: num_heads {heads} × head_dim {out.head_dim} != expand × hidden_size "
                            f"{out.d_inner}; fix config.json")
        return out

    def to_hf(self) -> dict:
        return {
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layer,
            "vocab_size": self.vocab_size,
            "state_size": self.d_state,
            "expand": self.expand,
            "head_dim": self.head_dim,
            "num_heads": self.n_heads,
            "n_groups": self.n_groups,
            "conv_kernel": self.d_conv,
            "chunk_size": self.chunk_size,
            "use_conv_bias": self.conv_bias,
            "use_bias": self.bias,
            "layer_norm_epsilon": self.norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "residual_in_fp32": self.residual_in_fp32,
            "time_step_limit": [v if math.isfinite(v) else {"__float__": str(v).replace("inf", "Infinity")}
                                for v in self.dt_limit],
            "hidden_act": "silu",
            # the end-of-text token of the zoo's tokenizer and of GPT-NeoX's, as the Mamba-1 export writes them
            # (transformers' defaults, 2 and 1, would never stop a generation)
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 0,
        }

    # --- mamba-ssm's config.json (state-spaces/mamba2-*) -----------------------------------------
    @classmethod
    def from_mamba_ssm(cls, cfg: dict) -> Mamba2Config:
        """From mamba-ssm's config.json with ssm_cfg.layer "Mamba2"; defaults are mamba-ssm's `Mamba2`'s."""
        ssm = dict(cfg.get("ssm_cfg") or {})
        # Variants this model does not implement: say so rather than load weights into the wrong graph.
        found = {"d_intermediate": cfg.get("d_intermediate", 0), "attn_layer_idx": cfg.get("attn_layer_idx") or [],
                 "rms_norm": cfg.get("rms_norm", True), "ssm_cfg.rmsnorm": ssm.get("rmsnorm", True),
                 "ssm_cfg.norm_before_gate": ssm.get("norm_before_gate", False),
                 "ssm_cfg.D_has_hdim": ssm.get("D_has_hdim", False)}
        bad = [f"{k}={v!r}" for k, v in found.items() if v != _PLAIN_MAMBA_SSM[k]]
        if bad:
            raise UserError(f"this Mamba-2 variant is not supported ({', '.join(bad)}); use a plain "
                            f"state-spaces/mamba2-* model")
        try:
            out = cls(
                d_model=cfg["d_model"],
                n_layer=cfg["n_layer"],
                vocab_size=_pad_vocab(cfg["vocab_size"], cfg.get("pad_vocab_size_multiple", 8)),
                d_state=ssm.get("d_state", 128),
                expand=ssm.get("expand", 2),
                head_dim=ssm.get("headdim", 64),
                n_groups=ssm.get("ngroups", 1),
                d_conv=ssm.get("d_conv", 4),
                chunk_size=ssm.get("chunk_size", 256),
                conv_bias=ssm.get("conv_bias", True),
                bias=ssm.get("bias", False),
                norm_eps=cfg.get("norm_epsilon", 1e-5),
                tie_embeddings=cfg.get("tie_embeddings", True),
                residual_in_fp32=cfg.get("residual_in_fp32", True),
                dt_limit=_dt_limit(ssm.get("dt_limit", (0.0, math.inf))),
            )
        except KeyError as e:
            raise UserError(f"Mamba-2 config.json lacks the key {e.args[0]!r}; is this a mamba-ssm config?") from e
        if ssm.get("d_ssm") not in (None, out.d_inner):
            raise UserError(f"Mamba-2 config: ssm_cfg.d_ssm {ssm['d_ssm']} != expand × d_model {out.d_inner} is not "
                            f"supported")
        return out

    def to_mamba_ssm(self) -> dict:
        check_mamba_ssm_norm_eps(self.norm_eps)
        ssm = {"layer": "Mamba2", "d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand,
               "headdim": self.head_dim, "ngroups": self.n_groups, "chunk_size": self.chunk_size,
               "conv_bias": self.conv_bias, "bias": self.bias}
        if self.dt_limit != (0.0, math.inf):  # mamba-ssm's default, left out as mamba-ssm writes it
            ssm["dt_limit"] = list(self.dt_limit)  # json writes infinity as Infinity, which json reads back
        return {
            "d_model": self.d_model,
            "d_intermediate": 0,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": ssm,
            "attn_layer_idx": [],
            "attn_cfg": {},
            "rms_norm": True,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True,
            "pad_vocab_size_multiple": 8,
            "tie_embeddings": self.tie_embeddings,
        }


def _dt_limit(value) -> tuple[float, float]:
    """HF's time_step_limit: two numbers, where transformers writes infinity as {"__float__": "Infinity"}."""
    try:
        low, high = (float(v["__float__"] if isinstance(v, dict) else v) for v in value)
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"Mamba-2 config: time_step_limit must be two numbers, got {value!r}; fix config.json") \
            from e
    if not 0 <= low <= high:
        raise UserError(f"Mamba-2 config: time_step_limit must be 0 <= low <= high, got {value!r}; fix config.json")
    return low, high
