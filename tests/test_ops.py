"""Every CPU backend against its PyTorch reference, forward and gradients (mamba-ssm's fp32 tolerance)."""

import numpy as np
import pytest
import torch

from simba_cli.ops.conv import causal_conv1d, causal_conv1d_ref
from simba_cli.ops.linear import onednn_available
from simba_cli.ops.scan import selective_scan
from simba_cli.ops.scan_cpu import scan_forward
from tests.conftest import NO_ONEDNN, count_onednn_calls

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


def test_scan_at_a_realistic_length(monkeypatch):
    """Long sequence, many channels, forward and gradients: six chunks of 16 channels (whatever the core
    count), whose gradients of B and C are summed, and the backward's segment replay."""
    import simba_cli.ops.scan_cpu as scan_cpu

    monkeypatch.setattr(scan_cpu, "channel_chunks", lambda batch, channels: 16)
    x = scan_inputs(b=1, l=300, d=96, n=16, seed=1)
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    weights = torch.randn(1, 300, 96, generator=torch.Generator().manual_seed(2))
    outs = []
    for backend in ("ref", "cpu"):
        y = selective_scan(**x, delta_softplus=True, backend=backend)
        outs.append((y, torch.autograd.grad((y * weights).sum(), list(leaves.values()))))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=RTOL, atol=ATOL)
    for name, got, want in zip(leaves, outs[1][1], outs[0][1]):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=f"gradient of {name}")


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


@pytest.mark.parametrize("shape", [(3, 9), (3, 1), (1, 5), (0, 4)])
def test_cpu_conv_reads_a_slice_of_a_wider_projection_in_place(shape):
    """The forward reads x where it lies, a column slice of in_proj's output (rows evenly spaced), or a
    transposed tensor (copied first), for any batch and length, an empty batch included."""
    from simba_cli.ops.numba_math import f32_flat_rows

    b, l = shape
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(b, l, 100, generator=g)
    w, bias = torch.randn(40, 4, generator=g), torch.randn(40, generator=g)
    for x in (wide[..., 30:70], torch.randn(b, 40, l, generator=g).transpose(1, 2)):
        flat, stride = f32_flat_rows(x)
        if x.data_ptr() == wide[..., 30:].data_ptr() and b * l > 1:
            assert stride == 100 and np.shares_memory(flat, wide.numpy())  # read in place, not copied
        with torch.no_grad():
            torch.testing.assert_close(causal_conv1d(x, w, bias), causal_conv1d_ref(x, w, bias), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("lengths", [None, torch.tensor([37, 20])])
def test_inference_scan_fuses_bias_softplus_and_gate(softplus, lengths, monkeypatch):
    """Without gradients the numba forward applies bias, softplus and the gate itself, reading z in place from
    a slice of a wider tensor (as in_proj's output is sliced): it equals the float64 reference."""
    x = scan_inputs()
    x["delta"] = 4 * x["delta"] if softplus else x["delta"].abs()
    tails = torch.tensor([30.0, -30.0, -100.0, 100.0])  # softplus' tails (dt itself must be positive)
    x["delta"][0, 3, :4] = tails if softplus else tails.abs()  # at t = 3: a state to decay
    wide = torch.cat([torch.randn_like(x["z"]), x["z"]], dim=-1)
    z_view = wide[..., x["z"].shape[-1]:]
    assert not z_view.is_contiguous()
    from simba_cli.ops import scan_cpu

    calls = []
    monkeypatch.setattr(scan_cpu, "scan_forward", lambda *a: calls.append(a) or scan_forward(*a))
    with torch.no_grad():
        y, last = selective_scan(**{**x, "z": z_view}, delta_softplus=softplus, lengths=lengths,
                                 return_last_state=True, backend="cpu")
    assert len(calls) == 1 and calls[0][-1] is z_view and calls[0][-2] == softplus  # the fused call ran
    ref = {k: v.double() for k, v in x.items()}
    y0, s0 = selective_scan(**ref, delta_softplus=softplus, lengths=lengths, return_last_state=True, backend="ref")
    torch.testing.assert_close(y.double(), y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), s0, rtol=1e-5, atol=1e-5)


def test_vectorised_softplus_matches_torch_in_float64():
    import numba as nb
    import numpy as np

    from simba_cli.ops.numba_math import softplus_inplace

    @nb.njit
    def run(x, p, ebits):
        softplus_inplace(x, p, ebits)

    x = torch.linspace(-80, 80, 200001)
    out = x.numpy().copy()
    run(out, np.empty_like(out), np.empty(out.shape, np.int32))
    ref = torch.nn.functional.softplus(x.double())
    rel = (torch.from_numpy(out).double() - ref).abs() / ref
    assert rel.max() < 5e-6, f"largest relative error {rel.max():.2e} at x = {x[rel.argmax()]:.3f}"
    assert rel[x > -20].max() < 2e-6


@pytest.mark.parametrize("first_block", [True, False])
def test_fused_residual_rms_norm_matches_the_block_under_autograd(first_block):
    """The inference path (numba add + RMSNorm) against the PyTorch ops the block runs when training."""
    from tests.conftest import random_model

    block = random_model().layers[1].train()  # parameters that require grad, norm weights around 1
    hidden = torch.randn(2, 40, 32) * 3
    residual = None if first_block else torch.randn(2, 40, 32)
    assert block.fused_norm_applies(hidden, residual) is False  # parameters require grad
    with torch.no_grad():
        assert block.fused_norm_applies(hidden[:, 0], None) is False  # a decode step's two rows
    normed0, res0 = block.norm_residual(hidden, residual)
    with torch.no_grad():
        assert block.fused_norm_applies(hidden, residual)
        normed1, res1 = block.norm_residual(hidden, residual)
        out1, _ = block(hidden, residual)
    torch.testing.assert_close(res1, res0.detach(), rtol=0, atol=0)
    torch.testing.assert_close(normed1, normed0.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out1.out, block(hidden, residual)[0].out.detach(), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("groups", [1, 3])
def test_fused_gated_rms_norm_matches_pytorch_in_float64(groups, monkeypatch):
    """Mamba-2's gated norm without gradients (one numba pass) against its PyTorch ops in float64; z is a slice of
    a wider projection, as in the mixer. A decode step's rows and training keep the PyTorch path."""
    import simba_cli.ops.norm_cpu as norm_cpu
    from simba_cli.models.mamba2 import GatedRMSNorm

    calls = []
    kernel = norm_cpu.gated_rms_norm
    monkeypatch.setattr(norm_cpu, "gated_rms_norm", lambda *a: calls.append(1) or kernel(*a))
    norm = GatedRMSNorm(96, groups, 1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    y, wide = torch.randn(2, 40, 96, generator=g), torch.randn(2, 40, 300, generator=g) * 4
    z = wide[..., 100:196]
    want = norm(y.double(), z.double())
    trained = norm(y, z)
    with torch.no_grad():
        got = norm(y, z)
        norm(y[:, 0], z[:, 0])
    assert calls == [1] and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, trained.detach(), rtol=1e-5, atol=1e-5)

def test_inference_step_sizes_equal_the_autograd_path(monkeypatch):
    """scan_dt without gradients (one numba pass) against softplus(delta + bias) with padding zeroed, on a
    strided slice as in_proj's output gives it."""
    from simba_cli.ops.scan import scan_dt
    from simba_cli.ops.scan_cpu import step_sizes

    g = torch.Generator().manual_seed(3)
    wide = 6 * torch.randn(3, 130, 50, generator=g)
    delta, bias, lengths = wide[..., 10:], torch.randn(40, generator=g), torch.tensor([130, 64, 1])
    want = torch.nn.functional.softplus(delta.double() + bias.double())
    want = want * (torch.arange(130)[None, :] < lengths[:, None])[..., None]
    from simba_cli.ops import scan_cpu

    calls = []
    monkeypatch.setattr(scan_cpu, "step_sizes", lambda *a: calls.append(a) or step_sizes(*a))
    with torch.no_grad():
        got = scan_dt(delta, bias, lengths)
    assert len(calls) == 1  # the numba pass ran
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-30)
    assert got[1, 64:].abs().max() == 0 and got[2, 1:].abs().max() == 0


@pytest.mark.parametrize("falcon", [False, True])
def test_compiled_decode_step_equals_the_pytorch_step(falcon, monkeypatch):
    """Decoding's numba kernels (`ops.step_cpu`) against the mixer's PyTorch ops, over several steps."""
    from simba_cli.models.mamba import MambaMixer
    from tests.conftest import random_model, tiny_config

    mixer = random_model(tiny_config(bcdt_rms=falcon)).layers[1].mixer
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 3, 32, generator=g)
    states = {}
    for compiled in (True, False):
        monkeypatch.setattr(MambaMixer, "compiled_step_applies", lambda self, *a, c=compiled: c)
        conv = torch.randn(3, 64, 4, generator=torch.Generator().manual_seed(1))
        ssm = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            outs = torch.stack([mixer.step(h, conv, ssm) for h in hidden])
        states[compiled] = (outs, conv, ssm)
    for got, want in zip(states[True], states[False]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    with torch.no_grad():
        assert mixer.compiled_step_applies(hidden[0], conv, ssm)
        assert not mixer.compiled_step_applies(hidden[0], conv, ssm.clone().requires_grad_())
    assert not mixer.compiled_step_applies(hidden[0], conv, ssm)  # parameters require grad
    for p in mixer.parameters():
        p.requires_grad_(False)
    assert mixer.compiled_step_applies(hidden[0], conv, ssm)
    assert not mixer.compiled_step_applies(hidden[0].clone().requires_grad_(), conv, ssm)  # a gradient to the input


KERNELS_SCRIPT = """
import sys, numba, numpy as np, torch
torch.set_num_threads(1); numba.set_num_threads(1); torch.manual_seed(0)
from simba_cli.ops.conv import causal_conv1d
from simba_cli.ops.norm_cpu import add_rms_norm, gated_rms_norm
from simba_cli.ops.scan import scan_dt, selective_scan
from simba_cli.ops.ssd_cpu import within_chunks
from simba_cli.ops.step_cpu import conv_step, ssm_step
b, l, d, n = 3, 48, 96, 8
xz, u, delta = torch.randn(b, l, 2 * d), torch.randn(b, l, d), torch.randn(b, l, d)
A, B, C = -torch.rand(d, n) - 0.1, torch.randn(b, l, n), torch.randn(b, l, n)
h, r = torch.randn(b, l, 48) * 3, torch.randn(b, l, 48)
with torch.no_grad():
    out = dict(conv=causal_conv1d(xz[..., :d], torch.randn(d, 4), torch.randn(d)),
               scan=selective_scan(u, delta, A, B, C, torch.randn(d), xz[..., d:], torch.randn(d), True),
               dt=scan_dt(delta, torch.randn(d)), norm=add_rms_norm(h, r, torch.randn(48), 1e-5)[0],
               norm_first=add_rms_norm(h, None, torch.randn(48), 1e-5)[0],
               conv_step=conv_step(torch.randn(b, d, 4), xz[:, 0, :d], torch.randn(d, 4), torch.randn(d)),
               ssm_step=ssm_step(torch.randn(b, d, n), u[:, 0], delta[:, 0], torch.randn(d), A, B[:, 0], C[:, 0],
                                 torch.randn(d), xz[:, 0, d:]))
    ssd = within_chunks(-torch.rand(b, 3, 4, 32), torch.rand(b, 3, 4, 32), torch.randn(b, 3, 2, 32, 32),
                        torch.randn(b, 96, 4, 16), torch.randn(4), 2)
    out.update(zip(("ssd_y", "ssd_u", "ssd_out"), ssd))
    out.update(gated_norm=gated_rms_norm(h, xz[..., :48], torch.randn(48), 2, 1e-5))
np.savez(sys.argv[1], **{k: v.numpy() for k, v in out.items()})
"""


def test_inference_kernels_give_the_same_bits_built_afresh_and_loaded_from_numba_cache(tmp_path):
    """A process that compiles the kernels and one that loads them from numba's on-disk cache must agree to the
    bit: runs that share work between processes compare as equal (tests/test_data_parallel.py). The RMSNorm
    kernel once summed its squares in float32 in an order that differed between the two builds."""
    import os
    import subprocess
    import sys

    import numpy as np

    script = tmp_path / "kernels.py"
    script.write_text(KERNELS_SCRIPT)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    for run in ("fresh", "cached"):
        done = subprocess.run([sys.executable, str(script), str(tmp_path / f"{run}.npz")], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    fresh, cached = np.load(tmp_path / "fresh.npz"), np.load(tmp_path / "cached.npz")
    for name in fresh:
        assert np.array_equal(fresh[name], cached[name]), name


# --- the CUDA paths' choices, checked on CPU tensors (the kernels themselves need a GPU) ----------------------

def test_causal_conv1d_gets_a_layout_its_kernel_accepts():
    """causal-conv1d takes (b, D, l) "channel last" only with D and the batch and row strides multiples of 8: a
    Mamba-1 x (a half of in_proj's output, row stride 2 D) goes as it is; Mamba-2's xBC of a zoo-m2 layer (row
    stride 559) and an odd D are copied."""
    from simba_cli.ops.conv import causal_conv1d_layout

    mamba1 = torch.randn(2, 10, 2 * 48)[..., :48]
    assert causal_conv1d_layout(mamba1).data_ptr() == mamba1.data_ptr()
    for x in (torch.randn(2, 10, 559)[..., 240:240 + 304], torch.randn(2, 10, 36)):
        laid = causal_conv1d_layout(x)
        assert laid.is_contiguous() and torch.equal(laid, x.transpose(1, 2))


def test_a_float32_dt_is_never_rounded_to_bf16_for_mamba_ssm(monkeypatch):
    """mamba-ssm takes delta in u's dtype: a pruning layer's float32 dt (what its criterion reads) goes to the
    Triton scan instead; a delta in u's dtype goes to mamba-ssm."""
    from simba_cli.ops import scan

    called = []
    monkeypatch.setattr(scan, "_gated_scan", lambda core, *a: called.append(core) or (a[0], None))
    monkeypatch.setattr(scan, "_mamba_ssm_scan", lambda *a: called.append("mamba_ssm") or (a[0], None))
    u = torch.randn(1, 4, 8, dtype=torch.bfloat16)
    A, B = -torch.rand(8, 2), torch.randn(1, 4, 2, dtype=torch.bfloat16)
    selective_scan(u, torch.rand(1, 4, 8), A, B, B, backend="mamba_ssm")
    selective_scan(u, torch.rand(1, 4, 8, dtype=torch.bfloat16), A, B, B, backend="mamba_ssm")
    assert called == [scan._TritonScan, "mamba_ssm"]


def test_mamba2_blocks_on_gpus_are_capped():
    from simba_cli.models.mamba2 import CPU_CHUNK_SIZE, GPU_MAX_CHUNK_SIZE, Mamba2Config, scan_chunk_size

    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=8, head_dim=8, chunk_size=256)
    assert scan_chunk_size(cfg, torch.device("cuda")) == GPU_MAX_CHUNK_SIZE == 64
    assert scan_chunk_size(cfg, torch.device("cpu")) == CPU_CHUNK_SIZE


# --- the projections' dispatch (ops.linear) ----------------------------------------------------------------

onednn_built = pytest.mark.skipif(not onednn_available(), reason=NO_ONEDNN)


@onednn_built
@pytest.mark.parametrize("shape", ["2d", "3d", "sliced", "one row"])
def test_onednn_projection_equals_f_linear_in_float64(shape, monkeypatch):
    from simba_cli.ops.linear import ONEDNN_MIN_WEIGHT, linear

    calls = count_onednn_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    k, n = 512, ONEDNN_MIN_WEIGHT // 512 + 3  # just over the size that takes oneDNN's path
    w, bias = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    x = {"2d": torch.randn(37, k, generator=g), "3d": torch.randn(2, 19, k, generator=g),
         "sliced": torch.randn(2, 19, k + 40, generator=g)[..., 7:7 + k],
         "one row": torch.randn(1, 1, k, generator=g)}[shape]
    with torch.no_grad():
        got = linear(x, w, bias)
    assert len(calls) == 1
    want = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@onednn_built
def test_projections_take_onednn_only_for_float32_cpu_inference_with_large_weights(monkeypatch):
    from simba_cli.ops import linear as ops_linear
    from simba_cli.ops.linear import ONEDNN_MIN_WEIGHT, Linear

    calls = count_onednn_calls(monkeypatch)
    layer = Linear(256, ONEDNN_MIN_WEIGHT // 256)
    x = torch.randn(3, 256)
    with torch.no_grad():
        layer(x)
        layer.double()(x.double())  # float64: F.linear
        layer.float()
        Linear(256, ONEDNN_MIN_WEIGHT // 256 - 1)(x)  # a smaller weight: F.linear
    assert len(calls) == 1
    y = layer(x)  # gradients wanted: F.linear, which autograd differentiates
    y.sum().backward()
    assert len(calls) == 1 and layer.weight.grad is not None
    monkeypatch.setenv("SIMBA_ONEDNN", "0")
    ops_linear.onednn_available.cache_clear()
    try:
        with torch.no_grad():
            layer(x)
        assert len(calls) == 1
    finally:
        monkeypatch.delenv("SIMBA_ONEDNN")
        ops_linear.onednn_available.cache_clear()
    with torch.no_grad():
        layer(x)
    assert len(calls) == 2
