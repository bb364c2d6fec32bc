"""A pure-PyTorch Mamba-1 language model with mamba-ssm's architecture and parameter names.

Blocks are pre-norm with a separate residual stream, as mamba-ssm's `Block`:
    residual = hidden + residual          (the stream; fp32 when residual_in_fp32)
    hidden   = mixer(norm(residual))
and the head reads norm_f(hidden + residual). Each block takes `lengths`, so a caller can run every
block on its own (shorter, gathered) sequence: that is all the Simba core needs from the model.

Mixer, shapes for hidden (b, l, d):
    x, z   = in_proj(hidden).chunk(2)               (b, l, D) each, D = d_inner
    u      = silu(causal_conv1d(x))                 (b, l, D)
    dt_low, B, C = x_proj(u).split(R, N, N)
    delta  = dt_low @ dt_proj.weight^T              (b, l, D); dt = softplus(delta + dt_proj.bias)
    A      = -exp(A_log)                            (D, N)
    y      = selective_scan(u, delta, A, B, C, D, z)  (gate silu(z) fused)
    out    = out_proj(y)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from simba_cli.models.config import MambaConfig
from simba_cli.ops.conv import causal_conv1d, conv_state_at
from simba_cli.ops.linear import Linear, linear
from simba_cli.ops.scan import scan_dt, selective_scan


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg: MambaConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.rms_norm else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


@dataclass
class ScanInputs:
    """What a layer's scan consumed, for the Simba criterion: u, dt, z (b, l, D); B, C (b, l, N); A (D, N).

    dt is the positive step size, softplus(delta + bias), zero on padding (`ops.scan.scan_dt`).
    """

    u: torch.Tensor
    dt: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    z: torch.Tensor


@dataclass
class MixerOutput:
    out: torch.Tensor  # (b, l, d)
    scan: ScanInputs | None = None
    conv_state: torch.Tensor | None = None  # (b, D, d_conv)
    ssm_state: torch.Tensor | None = None  # (b, D, N)


class MambaMixer(nn.Module):
    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d, di, n, r = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.in_proj = Linear(d, 2 * di, bias=cfg.bias)
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.x_proj = Linear(di, r + 2 * n, bias=False)
        self.dt_proj = Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, n))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = Linear(di, d, bias=cfg.bias)

    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def forward(self, hidden, lengths=None):
        return self.mix(hidden, lengths).out

    def project(self, u):
        """dt_low (R), B (N), C (N) from the scan input; Falcon-Mamba normalises each (RMS, no weight)."""
        cfg = self.cfg
        parts = self.x_proj(u).split([cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        if not cfg.bcdt_rms:
            return parts
        return tuple((p.float() * torch.rsqrt(p.float().pow(2).mean(-1, keepdim=True) + cfg.mixer_rms_eps)).type_as(p)
                     for p in parts)

    def mix(self, hidden, lengths=None, *, keep_scan_inputs: bool = False, final_state: bool = False) -> MixerOutput:
        cfg = self.cfg
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        u = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, silu=True)
        dt_low, B, C = self.project(u)
        delta = linear(dt_low, self.dt_proj.weight)
        A = self.A()
        if keep_scan_inputs:
            # The criterion reads the scan's own dt: computed once here, handed to the scan as is.
            dt = scan_dt(delta, self.dt_proj.bias, lengths)
            y, ssm_state = selective_scan(u, dt, A, B, C, self.D.float(), z=z, lengths=lengths,
                                          return_last_state=True)
        else:
            y, ssm_state = selective_scan(
                u, delta, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True, lengths=lengths, return_last_state=True,
            )
        result = MixerOutput(self.out_proj(y))
        if keep_scan_inputs:
            result.scan = ScanInputs(u, dt, A, B, C, z)
        if final_state:
            result.conv_state = conv_state_at(x, lengths, cfg.d_conv)
            result.ssm_state = ssm_state
        return result

    def step(self, hidden, conv_state, ssm_state):
        """One token: hidden (b, d); conv_state (b, D, d_conv) and ssm_state (b, D, N) updated in place."""
        if self.compiled_step_applies(hidden, conv_state, ssm_state):
            return self.compiled_step(hidden, conv_state, ssm_state)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        xc = (conv_state * self.conv1d.weight.squeeze(1)).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        u = F.silu(xc)
        dt_low, B, C = self.project(u)
        dt = F.softplus(self.dt_proj(dt_low)).float()
        dA = torch.exp(dt[..., None] * self.A())
        ssm_state.copy_(ssm_state * dA + (dt * u.float())[..., None] * B.float()[:, None, :])
        y = (ssm_state @ C.float()[..., None]).squeeze(-1) + self.D.float() * u.float()
        y = y * F.silu(z.float())
        return self.out_proj(y.to(hidden.dtype))

    def compiled_step_applies(self, hidden, conv_state, ssm_state) -> bool:
        """Decoding on CPU in float32 without gradients: the elementwise work runs in `ops.step_cpu`."""
        states = (conv_state, ssm_state)
        return (hidden.device.type == "cpu" and hidden.dtype == torch.float32
                and all(s.dtype == torch.float32 and s.is_contiguous() and not s.requires_grad for s in states)
                and not (torch.is_grad_enabled()
                         and (hidden.requires_grad or any(p.requires_grad for p in self.parameters()))))

    def compiled_step(self, hidden, conv_state, ssm_state):
        """`step` with its elementwise ops in two numba kernels; the same arithmetic in float32."""
        from simba_cli.ops.step_cpu import conv_step, ssm_step

        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        u = conv_step(conv_state, x, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        dt_low, B, C = self.project(u)
        y = ssm_step(ssm_state, u, linear(dt_low, self.dt_proj.weight), self.dt_proj.bias, self.A(), B, C,
                     self.D, z)
        return self.out_proj(y)


class Block(nn.Module):
    """A pre-norm block: `norm` then `mixer`, any family's (Mamba-1's by default; `models.mamba2` passes its own)."""

    def __init__(self, cfg, norm: nn.Module | None = None, mixer: nn.Module | None = None):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = make_norm(cfg) if norm is None else norm
        self.mixer = MambaMixer(cfg) if mixer is None else mixer

    def add_residual(self, hidden, residual):
        residual = hidden if residual is None else hidden + residual
        return residual.float() if self.residual_in_fp32 else residual

    def norm_residual(self, hidden, residual):
        """(normed, residual'): the stream entering this block, residual' = hidden + residual, and its norm."""
        if self.fused_norm_applies(hidden, residual):
            from simba_cli.ops.norm_cpu import add_rms_norm

            return add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps)
        residual = self.add_residual(hidden, residual)
        return self.norm(residual.to(self.norm.weight.dtype)), residual

    def fused_norm_applies(self, hidden, residual) -> bool:
        """Inference on CPU in float32 with an RMSNorm, over many tokens: the numba kernel (`ops.norm_cpu`) does
        add and norm. A decode step's few rows stay with PyTorch, cheaper there than starting numba's threads."""
        tensors = (hidden, self.norm.weight) if residual is None else (hidden, residual, self.norm.weight)
        return (isinstance(self.norm, RMSNorm) and hidden.device.type == "cpu" and hidden[..., 0].numel() >= 64
                and all(t.dtype == torch.float32 for t in tensors)
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))

    def forward(self, hidden, residual, lengths=None, **mix_kwargs):
        """Returns (MixerOutput, residual): the mixer's output and the stream entering this block."""
        normed, residual = self.norm_residual(hidden, residual)
        return self.mixer.mix(normed, lengths, **mix_kwargs), residual


class BlockLM(nn.Module):
    """What every family's LM shares: embedding -> blocks (each `forward(hidden, residual, lengths, **mix_kwargs)
    -> (MixerOutput, residual)`) -> norm_f -> lm_head. A subclass builds `backbone.embedding`,
    `backbone.layers`, `backbone.norm_f` and `lm_head`, and sets `cfg` (with d_model, n_layer, tie_embeddings,
    residual_in_fp32: a MambaConfig or a Mamba2Config). The Simba core and decoding use only what this class
    and its blocks offer."""

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    def tie_weights(self):
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def embed(self, input_ids):
        return self.backbone.embedding(input_ids)

    def head(self, hidden, residual):
        """Logits from the last block's output and the stream: norm_f(hidden + residual) -> lm_head."""
        stream = hidden if residual is None else hidden + residual
        return self.logits_from_stream(stream)

    def logits_from_stream(self, stream):
        normed = self.backbone.norm_f(stream.to(self.backbone.norm_f.weight.dtype))
        return self.lm_head(normed)

    def forward(self, input_ids, lengths=None):
        """Dense forward: input_ids (b, l) -> logits (b, l, V). Positions past `lengths` are padding."""
        hidden, residual = self.embed(input_ids), None
        for block in self.layers:
            out, residual = block(hidden, residual, lengths)
            hidden = out.out
        return self.head(hidden, residual)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights count once


class MambaLM(BlockLM):
    """Mamba-1 LM. State-dict keys are mamba-ssm's (`backbone.embedding`, `backbone.layers.i`, ...)."""

    def __init__(self, cfg: MambaConfig, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = nn.Module()
        self.backbone.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.backbone.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.backbone.norm_f = make_norm(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if init:
            self.reset_parameters()
        else:
            self.tie_weights()

    def reset_parameters(self, seed: int | None = None, dt_min: float = 1e-3, dt_max: float = 0.1):
        """Mamba's initialisation: S4D-real A, dt log-uniform in [dt_min, dt_max], residual rescaling."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cfg = self.cfg
        with torch.no_grad():
            nn.init.normal_(self.backbone.embedding.weight, std=0.02, generator=gen)
            for block in self.layers:
                m = block.mixer
                for lin in (m.in_proj, m.x_proj, m.out_proj):
                    nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
                    if lin.bias is not None:
                        lin.bias.zero_()
                # GPT-2 style: scale the residual branch's last projection by 1/sqrt(n_layer).
                m.out_proj.weight /= math.sqrt(cfg.n_layer)
                nn.init.kaiming_uniform_(m.conv1d.weight, a=math.sqrt(5), generator=gen)
                if m.conv1d.bias is not None:
                    bound = 1 / math.sqrt(cfg.d_conv)
                    nn.init.uniform_(m.conv1d.bias, -bound, bound, generator=gen)
                std = cfg.dt_rank ** -0.5
                nn.init.uniform_(m.dt_proj.weight, -std, std, generator=gen)
                dt = torch.exp(torch.rand(cfg.d_inner, generator=gen) * (math.log(dt_max) - math.log(dt_min))
                               + math.log(dt_min)).clamp(min=1e-4)
                m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
                m.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(cfg.d_inner, 1))
                m.D.fill_(1.0)
                block.norm.weight.fill_(1.0)
            self.backbone.norm_f.weight.fill_(1.0)
        self.tie_weights()
