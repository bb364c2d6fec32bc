"""The Mamba-2 model: the chunked SSD scan against its recurrence."""

import json

import pytest
import torch

from simba_cli.errors import UserError
from simba_cli.models.mamba2 import Mamba2Config, ssd_scan_chunked, ssd_scan_ref


def scan_inputs(b=2, l=21, heads=4, head_dim=3, groups=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, heads, head_dim, generator=gen, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(b, l, heads, generator=gen, dtype=torch.float64))
    A = -torch.exp(torch.randn(heads, generator=gen, dtype=torch.float64))
    B = torch.randn(b, l, groups, n, generator=gen, dtype=torch.float64)
    C = torch.randn(b, l, groups, n, generator=gen, dtype=torch.float64)
    D = torch.randn(heads, generator=gen, dtype=torch.float64)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("chunk", [1, 4, 5, 7, 21, 32])
def test_chunked_scan_equals_recurrence(groups, chunk):
    x, dt, A, B, C, D = scan_inputs(groups=groups, seed=groups * 100 + chunk)
    want, want_state = ssd_scan_ref(x, dt, A, B, C, D, return_final_state=True)
    got, got_state = ssd_scan_chunked(x, dt, A, B, C, D, chunk_size=chunk, return_final_state=True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_state, want_state, rtol=0, atol=1e-10)


def test_chunked_scan_stays_finite_under_strong_decay():
    x, dt, A, B, C, D = scan_inputs(l=40, groups=1)
    dt = dt * 1e3  # exp(dt * A) underflows to 0 over a few tokens: no inf or nan may appear
    y = ssd_scan_chunked(x.float(), dt.float(), A.float(), B.float(), C.float(), D.float(), chunk_size=16)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ssd_scan_ref(x, dt, A, B, C, D), rtol=1e-4, atol=1e-4)


def test_config_round_trip_and_bad_values():
    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=8, head_dim=16, n_groups=2, chunk_size=8)
    assert (cfg.d_inner, cfg.n_heads) == (64, 4)
    assert Mamba2Config.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg
    with pytest.raises(UserError, match="not a multiple of head_dim"):
        Mamba2Config(d_model=32, n_layer=2, vocab_size=64, head_dim=24)
    with pytest.raises(UserError, match="do not split into n_groups 3"):
        Mamba2Config(d_model=32, n_layer=2, vocab_size=64, head_dim=16, n_groups=3)
    with pytest.raises(UserError, match="chunk_size must be a positive integer"):
        Mamba2Config(d_model=32, n_layer=2, vocab_size=64, chunk_size=0)
