"""The Triton kernels against their PyTorch references, under TRITON_INTERPRET=1 (set in conftest)."""

import pytest
import torch
from simba_kernels.scan import selective_scan_bwd, selective_scan_fwd, selective_scan_fwd_reference
from simba_kernels.simba_score import simba_score, simba_score_reference

RTOL, ATOL = 6e-4, 2e-3


def inputs(b=2, l=40, d=24, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    dt = torch.nn.functional.softplus(r(b, l, d) - 1)
    return dict(u=r(b, l, d), dt=dt, A=-(torch.rand(d, n, generator=g) + 0.2), B=r(b, l, n), C=r(b, l, n))


@pytest.mark.parametrize("lengths", [None, torch.tensor([40, 23])])
@pytest.mark.parametrize("with_d", [True, False])
def test_scan_kernel_forward_and_backward(lengths, with_d):
    x = inputs()
    D_skip = torch.randn(x["u"].shape[-1]) if with_d else None
    y, last = selective_scan_fwd(**x, D_skip=D_skip, lengths=lengths)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    if with_d:
        leaves["D_skip"] = D_skip.clone().requires_grad_()
    y0, last0 = selective_scan_fwd_reference(**leaves, lengths=lengths) if with_d else \
        selective_scan_fwd_reference(**leaves, D_skip=None, lengths=lengths)
    torch.testing.assert_close(y, y0.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(last, last0.detach(), rtol=RTOL, atol=ATOL)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad((y0 * gy).sum(), list(leaves.values()))
    gu, gdt, gA, gB, gC, gD = selective_scan_bwd(gy, **x, D_skip=D_skip, lengths=lengths)
    got = dict(u=gu, dt=gdt, A=gA, B=gB, C=gC, D_skip=gD)
    for name, w in zip(leaves, want):
        torch.testing.assert_close(got[name], w, rtol=RTOL, atol=ATOL, msg=f"gradient of {name}")
    if not with_d:
        assert gD is None


def test_scan_kernel_backward_sums_over_channel_blocks():
    """130 channels: three programs of at most 64 channels a sequence, the last one partial; the gradients of
    B and C are sums over those programs."""
    x = inputs(l=12, d=130, n=4, seed=2)
    lengths, D_skip = torch.tensor([12, 7]), torch.randn(130)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    y0, _ = selective_scan_fwd_reference(**leaves, D_skip=D_skip, lengths=lengths)
    y, _ = selective_scan_fwd(**x, D_skip=D_skip, lengths=lengths)
    torch.testing.assert_close(y, y0.detach(), rtol=RTOL, atol=ATOL)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    want = torch.autograd.grad((y0 * gy).sum(), list(leaves.values()))
    got = selective_scan_bwd(gy, **x, D_skip=D_skip, lengths=lengths)[:5]
    for name, g, w in zip(leaves, got, want):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=f"gradient of {name}")


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_simba_score_kernel(absolute, gated):
    x = inputs(l=37, d=40, n=5)  # neither a multiple of the blocks: exercises every mask
    last_idx = torch.tensor([36, 19])
    gate_T = torch.nn.functional.silu(torch.randn(2, 40)) if gated else None
    got = simba_score(**x, last_idx=last_idx, absolute=absolute, gate_T=gate_T)
    want = simba_score_reference(**x, last_idx=last_idx, absolute=absolute, gate_T=gate_T)
    assert torch.isinf(got[1, 20:]).all() and (got[1, 20:] < 0).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
