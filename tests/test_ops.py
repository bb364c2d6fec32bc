"""Every CPU backend against its PyTorch reference, forward and gradients (mamba-ssm's fp32 tolerance)."""

import pytest
import torch

from simba_cli.ops.conv import causal_conv1d, causal_conv1d_ref
from simba_cli.ops.scan import selective_scan

RTOL, ATOL = 6e-4, 2e-3


def scan_inputs(b=2, l=37, d=40, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(u=r(b, l, d), delta=0.5 * r(b, l, d), A=-(2 * torch.rand(d, n, generator=g) + 0.1),
                B=r(b, l, n), C=r(b, l, n), D_skip=r(d), z=r(b, l, d), delta_bias=0.1 * r(d))


@pytest.mark.parametrize("backend", ["cpu", "triton"])  # triton runs in the interpreter (conftest)
@pytest.mark.parametrize("lengths", [None, torch.tensor([37, 20])])
@pytest.mark.parametrize("gate", [True, False])
def test_compiled_scan_matches_reference_with_gradients(backend, lengths, gate):
    x = scan_inputs()
    if not gate:
        x["z"] = None
    leaves = {k: v.requires_grad_() for k, v in x.items() if v is not None}
    outs = {}
    for name in ("ref", backend):
        y, last = selective_scan(**x, delta_softplus=True, lengths=lengths, return_last_state=True, backend=name)
        g = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), list(leaves.values()))
        outs[name] = (y, last, g)
    (y0, s0, g0), (y1, s1, g1) = outs["ref"], outs[backend]
    torch.testing.assert_close(y1, y0, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(s1, s0, rtol=RTOL, atol=ATOL)
    for name, a, b in zip(leaves, g1, g0):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=f"gradient of {name}")
    if lengths is not None:
        assert y1[1, 20:].abs().max() == 0


def test_scan_at_a_realistic_length():
    """Long sequence, many channels: exercises chunking over channels and the backward's segment replay."""
    x = scan_inputs(b=1, l=300, d=96, n=16, seed=1)
    y0 = selective_scan(**x, delta_softplus=True, backend="ref")
    y1 = selective_scan(**x, delta_softplus=True, backend="cpu")
    torch.testing.assert_close(y1, y0, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("silu", [True, False])
def test_cpu_conv_matches_torch_conv(silu):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 40, generator=g, requires_grad=True)
    w = torch.randn(40, 4, generator=g, requires_grad=True)
    b = torch.randn(40, generator=g, requires_grad=True)
    y1, y0 = causal_conv1d(x, w, b, silu), causal_conv1d_ref(x, w, b, silu)
    torch.testing.assert_close(y1, y0, rtol=RTOL, atol=ATOL)
    gy = torch.randn(y0.shape, generator=g)
    for a, c in zip(torch.autograd.grad((y1 * gy).sum(), (x, w, b)), torch.autograd.grad((y0 * gy).sum(), (x, w, b))):
        torch.testing.assert_close(a, c, rtol=RTOL, atol=ATOL)
