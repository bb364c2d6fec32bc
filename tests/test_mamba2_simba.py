"""Simba on Mamba-2 (SSD): the criterion against brute force, its stability, and FLOPs by hand."""

import pytest
import torch
import torch.nn.functional as F

from simba_cli.errors import UserError
from simba_cli.models.mamba2 import Mamba2Config, Mamba2LM, Mamba2Mixer, ssd_scan_ref
from simba_cli.ops.conv import causal_conv1d
from simba_cli.simba.criteria_ssd import ssd_contributions, ssd_score
from simba_cli.simba.flops_ssd import (
    OFFICIAL_MAMBA2,
    count_head_ssd,
    criterion_flops_per_token_ssd,
    dense_flops_per_token_ssd,
    layer_flops_per_token_ssd,
)


def tiny_ssd_config(groups=2) -> Mamba2Config:
    # D = 16 channels, H = 4 heads of P = 4, N = 5
    return Mamba2Config(d_model=8, n_layer=2, vocab_size=16, d_state=5, expand=2, head_dim=4, n_groups=groups,
                        chunk_size=4)


@torch.no_grad()
def layer_scan(groups=2, lengths=(13, 8), seed=0):
    """A random float64 mixer's scan inputs on right-padded random hidden states (garbage past each length)."""
    cfg = tiny_ssd_config(groups)
    torch.manual_seed(seed)
    mixer = Mamba2Mixer(cfg).double()
    mixer.A_log.copy_(0.5 * torch.randn(cfg.n_heads))
    mixer.dt_bias.copy_(0.5 * torch.randn(cfg.n_heads))
    mixer.D.copy_(1 + 0.3 * torch.randn(cfg.n_heads))
    b, l = len(lengths), max(lengths)
    hidden = torch.randn(b, l, cfg.d_model, dtype=torch.float64)
    z, xbc, dt_raw = mixer.in_proj(hidden).split([cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1)
    xbc = causal_conv1d(xbc, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, silu=True)
    x, B, C = xbc.split([cfg.d_inner, cfg.n_groups * cfg.d_state, cfg.n_groups * cfg.d_state], dim=-1)
    dt = F.softplus(dt_raw + mixer.dt_bias)
    return dict(x=x.reshape(b, l, cfg.n_heads, cfg.head_dim), dt=dt, A=mixer.A(),
                B=B.reshape(b, l, cfg.n_groups, cfg.d_state), C=C.reshape(b, l, cfg.n_groups, cfg.d_state),
                D=mixer.D.detach(), z=z, lengths=torch.tensor(lengths))


def brute_force(s, with_skip=False):
    """dy_T(t) = y_T(full) - y_T(x_t = 0) from the recurrence, per sequence: a list of (T + 1, H, P)."""
    out = []
    D = s["D"] if with_skip else None
    for i, n in enumerate(s["lengths"].tolist()):
        x, dt, B, C = (s[k][i:i + 1, :n] for k in ("x", "dt", "B", "C"))
        full = ssd_scan_ref(x, dt, s["A"], B, C, D)[0, n - 1]
        rows = []
        for t in range(n):
            cut = x.clone()
            cut[:, t] = 0
            rows.append(full - ssd_scan_ref(cut, dt, s["A"], B, C, D)[0, n - 1])
        out.append(torch.stack(rows))
    return out


def contributions(s):
    return ssd_contributions(s["x"], s["dt"], s["A"], s["B"], s["C"], s["lengths"])


@pytest.mark.parametrize("groups", [1, 2])
def test_contributions_equal_brute_force(groups):
    """Without the skip term every t matches; with it, every t < T, and at T the difference is D_h x_T."""
    s = layer_scan(groups)
    got = contributions(s)
    assert got.shape == s["x"].shape and got.dtype == torch.float64
    for i, (brute, n) in enumerate(zip(brute_force(s), s["lengths"].tolist())):
        torch.testing.assert_close(got[i, :n], brute, rtol=0, atol=1e-10)
        assert torch.equal(got[i, n:], torch.zeros_like(got[i, n:]))  # padding
    for i, (brute, n) in enumerate(zip(brute_force(s, with_skip=True), s["lengths"].tolist())):
        torch.testing.assert_close(got[i, :n - 1], brute[:n - 1], rtol=0, atol=1e-10)
        torch.testing.assert_close(got[i, n - 1] + s["D"][:, None] * s["x"][i, n - 1], brute[n - 1],
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("variant", ["simba", "simba-abs", "simba-gated"])
def test_scores_are_reductions_of_brute_force(groups, variant):
    s = layer_scan(groups, seed=1)
    lengths = s["lengths"]
    z_T = s["z"][torch.arange(2), lengths - 1]  # (b, H * P)
    got = ssd_score(s["x"], s["dt"], s["A"], s["B"], s["C"], lengths, variant, z_T=z_T)
    assert got.shape == (2, 13)
    for i, (brute, n) in enumerate(zip(brute_force(s), lengths.tolist())):
        if variant == "simba-gated":
            brute = brute * F.silu(z_T[i]).reshape(brute.shape[1:])
        if variant == "simba-abs":
            brute = brute.abs()
        torch.testing.assert_close(got[i, :n], brute.flatten(1).amax(-1), rtol=0, atol=1e-10)
        assert torch.isneginf(got[i, n:]).all()
    if variant == "simba-gated":  # the gate may come per head too
        z_heads = z_T.reshape(2, *s["x"].shape[2:])
        assert torch.equal(ssd_score(s["x"], s["dt"], s["A"], s["B"], s["C"], lengths, variant, z_heads), got)


def test_score_rejects_bad_arguments():
    s = layer_scan()
    args = [s[k] for k in ("x", "dt", "A", "B", "C", "lengths")]
    with pytest.raises(UserError, match="unknown Simba variant"):
        ssd_score(*args, variant="simba-max")
    with pytest.raises(UserError, match="needs the gate"):
        ssd_score(*args, variant="simba-gated")
    with pytest.raises(UserError, match="z_T must be"):
        ssd_score(*args, variant="simba-gated", z_T=torch.zeros(2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_are_stable_with_large_steps_and_strong_decay(dtype):
    """sum dt * |A| reaches ~1e7: a difference of running sums exponentiated would overflow; S_t does not."""
    gen = torch.Generator().manual_seed(0)
    b, l, H, P, G, N = 2, 300, 4, 3, 2, 5
    x = torch.randn(b, l, H, P, generator=gen).to(dtype)
    dt = (50 + 200 * torch.rand(b, l, H, generator=gen)).to(dtype)
    A = -torch.tensor([1e-4, 1.0, 20.0, 200.0], dtype=dtype)
    B, C = (torch.randn(b, l, G, N, generator=gen).to(dtype) for _ in range(2))
    lengths = torch.tensor([300, 171])
    z_T = torch.randn(b, H * P, generator=gen).to(dtype)
    for variant in ("simba", "simba-abs", "simba-gated"):
        scores = ssd_score(x, dt, A, B, C, lengths, variant, z_T=z_T)
        assert torch.isfinite(scores[0]).all() and torch.isfinite(scores[1, :171]).all()
        assert torch.isneginf(scores[1, 171:]).all()
    contrib = ssd_contributions(x, dt, A, B, C, lengths)
    assert torch.isfinite(contrib).all()
    # at T the decay is exp(0) = 1 exactly: dy_T(T) = (C_T . B_T) dt_T x_T
    T = 170
    cb = (C[1, T] * B[1, T]).sum(-1).repeat_interleave(2)
    torch.testing.assert_close(contrib[1, T], (cb * dt[1, T])[:, None] * x[1, T])


def test_empty_and_zero_length_sequences():
    s = layer_scan(lengths=(5, 1))
    scores = ssd_score(s["x"], s["dt"], s["A"], s["B"], s["C"], torch.tensor([5, 0]))
    assert torch.isneginf(scores[1]).all() and torch.isfinite(scores[0]).all()
    empty = ssd_score(s["x"][:, :0], s["dt"][:, :0], s["A"], s["B"][:, :0], s["C"][:, :0], torch.tensor([0, 0]))
    assert empty.shape == (2, 0)


# --- FLOPs -------------------------------------------------------------------------------------------

def test_flops_of_a_tiny_config_by_hand():
    # d = 8, D = 16, H = 4, P = 4, G = 2, N = 5, k = 4, V = 16, 2 layers
    cfg = tiny_ssd_config(groups=2)
    assert layer_flops_per_token_ssd(cfg) == {
        "norm": 4 * 8,  # 32
        "in_proj": 2 * 8 * (2 * 16 + 2 * 2 * 5 + 4),  # 16 * 56 = 896
        "conv": 2 * (16 + 2 * 2 * 5) * 4,  # 2 * 36 * 4 = 288
        "scan": 5 * 4 * 4 * 5 + 3 * 4 * 4 + 4,  # 400 + 48 + 4 = 452
        "gated_norm": 4 * 16,  # 64
        "out_proj": 2 * 16 * 8,  # 256
    }
    # layer: 32 + 896 + 288 + 452 + 64 + 256 = 1988; head: 4 * 8 + 2 * 8 * 16 = 288
    assert count_head_ssd(cfg, 3) == 3 * 288
    assert dense_flops_per_token_ssd(cfg) == 2 * 1988 + 288 == 4264
    # criterion: 2 G N + 4 H + 2 D = 20 + 16 + 32
    assert criterion_flops_per_token_ssd(cfg, "simba") == criterion_flops_per_token_ssd(cfg, "simba-gated") == 68
    assert criterion_flops_per_token_ssd(cfg, "dt-norm") == 8
    assert criterion_flops_per_token_ssd(cfg, "output-norm") == 16
    assert criterion_flops_per_token_ssd(cfg, "recent") == 0


def test_scan_flops_count_the_recurrence_loop():
    """One step of the loop, operation by operation, per head h and channel p (state row of N entries)."""
    cfg = tiny_ssd_config()
    H, P, N = cfg.n_heads, cfg.head_dim, cfg.d_state
    flops = 0
    for _h in range(H):
        flops += 1  # dt * A_h
        for _p in range(P):
            flops += 1  # u = dt * x
            flops += N  # decay * state
            flops += 2 * N  # + u * B
            flops += 2 * N  # y = state . C
            flops += 2  # + D_h * x
    assert layer_flops_per_token_ssd(cfg)["scan"] == flops


def test_dense_flops_of_mamba2_130m_by_hand():
    cfg = OFFICIAL_MAMBA2["mamba2-130m"]
    # d = 768, D = 1536, H = 24, P = 64, G = 1, N = 128, k = 4, V = 50288, 24 layers
    norm = 4 * 768  # 3,072
    in_proj = 2 * 768 * (3072 + 256 + 24)  # 1536 * 3352 = 5,148,672
    conv = 2 * (1536 + 256) * 4  # 14,336
    scan = 5 * 24 * 64 * 128 + 3 * 1536 + 24  # 983,040 + 4,608 + 24 = 987,672
    gated_norm = 4 * 1536  # 6,144
    out_proj = 2 * 1536 * 768  # 2,359,296
    layer = norm + in_proj + conv + scan + gated_norm + out_proj
    assert layer == 8_519_192
    head = 4 * 768 + 2 * 768 * 50288  # 3,072 + 77,242,368 = 77,245,440
    assert dense_flops_per_token_ssd(cfg) == 24 * layer + head == 281_706_048


@pytest.mark.parametrize("name,nominal", [("mamba2-130m", 130e6), ("mamba2-370m", 370e6), ("mamba2-780m", 780e6),
                                          ("mamba2-1.3b", 1.3e9), ("mamba2-2.7b", 2.7e9)])
def test_official_configs_have_their_nominal_size(name, nominal):
    cfg = OFFICIAL_MAMBA2[name]
    assert cfg.vocab_size == 50288 and cfg.vocab_size % 16 == 0 and cfg.tie_embeddings
    assert (cfg.d_state, cfg.head_dim, cfg.expand, cfg.n_groups, cfg.chunk_size) == (128, 64, 2, 1, 256)
    with torch.device("meta"):
        model = Mamba2LM(cfg)
    params = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once
    assert abs(params / nominal - 1) < 0.10, (name, params)
