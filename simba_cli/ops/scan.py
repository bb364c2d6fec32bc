"""One selective-scan function, several backends, chosen by device.

    ref        the PyTorch loop in `scan_ref` (the oracle; any device and dtype; slow)
    cpu        the compiled numba scan in `scan_cpu`, forward and backward (default on CPU)
    triton     the Triton kernel in `simba_kernels.scan` (default on CUDA without mamba-ssm)
    mamba_ssm  mamba-ssm's CUDA op, when that optional extra is installed (default on CUDA then)

`SIMBA_SCAN_BACKEND` overrides the choice. mamba-ssm is imported only when first asked for: it does
not import on CPU-only machines, and once imported it changes transformers' Mamba code path.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from simba_cli.errors import UserError
from simba_cli.ops.scan_ref import selective_scan_ref

BACKENDS = ("ref", "cpu", "triton", "mamba_ssm")


@functools.cache
def mamba_ssm_available() -> bool:
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build
        return False
    return True


def default_backend(device: torch.device, dtype: torch.dtype) -> str:
    chosen = os.environ.get("SIMBA_SCAN_BACKEND")
    if chosen:
        if chosen not in BACKENDS:
            raise UserError(f"SIMBA_SCAN_BACKEND={chosen!r} is not a backend; use one of {', '.join(BACKENDS)}")
        return chosen
    if device.type == "cuda":
        return "mamba_ssm" if mamba_ssm_available() else "triton"
    if device.type == "cpu" and dtype != torch.float64:
        return "cpu"
    return "ref"


def selective_scan(
    u, delta, A, B, C, D_skip=None, z=None, delta_bias=None, delta_softplus=False,
    lengths=None, return_last_state=False, backend: str | None = None,
):
    """Selective scan, token-major layout. See `scan_ref` for shapes and the recurrence.

    Returns y (b, l, D), and the state after each sequence's last real token (b, D, N) when
    `return_last_state`; that state carries no gradient.
    """
    backend = backend or default_backend(u.device, u.dtype)
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus, lengths,
                                  return_last_state)
    if backend == "cpu":
        y, last = _gated_scan(_CpuScan, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus, lengths)
    elif backend == "triton":
        y, last = _gated_scan(_TritonScan, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus, lengths)
    elif backend == "mamba_ssm" and delta.dtype != u.dtype:
        # mamba-ssm takes delta in u's dtype: a float32 dt (a pruning layer's, which its criterion also reads)
        # would be rounded to bfloat16 there, so that layer scans with the Triton kernel, which takes it as is
        y, last = _gated_scan(_TritonScan, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus, lengths)
    elif backend == "mamba_ssm":
        y, last = _mamba_ssm_scan(u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus, lengths)
    else:
        raise UserError(f"unknown scan backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return (y, last) if return_last_state else y


def scan_dt(delta, delta_bias=None, lengths=None, softplus=True) -> torch.Tensor:
    """dt = softplus(delta + delta_bias), zero on padding: (b, l, D), float32 (float64 stays float64).

    The step sizes the scan consumes; the Simba criterion reads the same tensor (`MambaMixer.mix`).
    """
    if (softplus and delta.device.type == "cpu" and delta.dtype == torch.float32 and delta.dim() == 3
            and not (torch.is_grad_enabled() and (delta.requires_grad or getattr(delta_bias, "requires_grad", False)))):
        from simba_cli.ops.scan_cpu import step_sizes  # inference: one numba pass instead of three

        return step_sizes(delta, delta_bias, lengths)
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    dt = delta.to(work) if delta_bias is None else delta.to(work) + delta_bias.to(work)
    if softplus:
        dt = F.softplus(dt)
    if lengths is not None:
        dt = dt * (torch.arange(dt.shape[1], device=dt.device)[None, :] < lengths[:, None])[..., None]
    return dt


def _gated_scan(core, u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus, lengths):
    # softplus, padding and the gate are cheap vectorised PyTorch ops (autograd differentiates them);
    # the compiled core (numba on CPU, Triton on CUDA) does the recurrence, where the time goes.
    if core is _CpuScan and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, B, C, D_skip, z, delta_bias))):
        # Inference: the numba forward applies bias, softplus and the gate inside its loop.
        from simba_cli.ops.scan_cpu import scan_forward

        y, last = scan_forward(u, delta, A, B, C, D_skip, lengths, delta_bias, delta_softplus, z)
        return y.to(u.dtype), last
    dt = scan_dt(delta.float(), delta_bias, lengths, delta_softplus)
    y, last = core.apply(u, dt, A, B, C, D_skip, lengths)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), last


class _CoreScan(torch.autograd.Function):
    """The recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t, by a compiled
    backend: subclasses name `forward_fn(u, dt, A, B, C, D_skip, lengths) -> (y, last)` and
    `backward_fn(gy, u, dt, A, B, C, D_skip, lengths) -> (gu, gdt, gA, gB, gC, gD)`."""

    @staticmethod
    def forward_fn(*args):
        raise NotImplementedError

    @staticmethod
    def backward_fn(*args):
        raise NotImplementedError

    @classmethod
    def forward(cls, ctx, u, dt, A, B, C, D_skip, lengths):
        ctx.save_for_backward(u, dt, A, B, C, D_skip, lengths)
        y, last = cls.forward_fn(u, dt, A, B, C, D_skip, lengths)
        ctx.mark_non_differentiable(last)
        return y, last

    @classmethod
    def backward(cls, ctx, gy, _glast):
        u, dt, A, B, C, D_skip, lengths = ctx.saved_tensors
        grads = cls.backward_fn(gy, u, dt, A, B, C, D_skip, lengths)
        inputs = (u, dt, A, B, C, D_skip)
        return (*(None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs)), None)


class _CpuScan(_CoreScan):
    @staticmethod
    def forward_fn(*args):
        from simba_cli.ops.scan_cpu import scan_forward

        return scan_forward(*args)

    @staticmethod
    def backward_fn(*args):
        from simba_cli.ops.scan_cpu import scan_backward

        return scan_backward(*args)


class _TritonScan(_CoreScan):
    @staticmethod
    def forward_fn(*args):
        from simba_kernels.scan import selective_scan_fwd

        return selective_scan_fwd(*args)

    @staticmethod
    def backward_fn(*args):
        from simba_kernels.scan import selective_scan_bwd

        return selective_scan_bwd(*args)


def _mamba_ssm_scan(u, delta, A, B, C, D_skip, z, delta_bias, delta_softplus, lengths):
    if not mamba_ssm_available():
        raise UserError("scan backend mamba_ssm needs the GPU extra: pip install 'simba-cli[gpu]'")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if lengths is not None:
        # mamba-ssm has no lengths argument: dt = 0 on padding keeps the state, so the last state
        # is the one after the last real token (padding outputs are zeroed below).
        mask = torch.arange(u.shape[1], device=u.device)[None, :] < lengths[:, None]
        if delta_softplus:
            pad_delta = torch.full_like(delta, -1e4)  # softplus(-1e4 + bias) == 0
        else:
            pad_delta = (torch.zeros_like(delta) - (0 if delta_bias is None else delta_bias)).to(delta.dtype)
        delta = torch.where(mask[..., None], delta, pad_delta)
    t = lambda x: None if x is None else x.transpose(1, 2).contiguous()
    y, last = selective_scan_fn(
        t(u), t(delta), A.float(), t(B), t(C), None if D_skip is None else D_skip.float(), t(z),
        None if delta_bias is None else delta_bias.float(), delta_softplus, return_last_state=True,
    )
    y = y.transpose(1, 2)
    if lengths is not None:
        y = y * mask[..., None].to(y.dtype)
    return y, last
