"""The Mamba-2 model: the chunked SSD scan against its recurrence, the model against transformers' Mamba2ForCausalLM."""

import importlib.util
import json

import pytest
import torch
from transformers import Mamba2Config as HFMamba2Config
from transformers import Mamba2ForCausalLM

from simba_cli.errors import UserError
from simba_cli.models import mamba2
from simba_cli.models.mamba2 import Mamba2Config, ssd_scan_chunked, ssd_scan_ref
from simba_cli.models.mamba2_checkpoint import load_mamba2, save_mamba2


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


@pytest.mark.parametrize("chunk", [4, 7, 32])
def test_chunked_scan_gradients_equal_the_recurrence(chunk):
    """Training differentiates the chunked form (several chunks, the state carried across them)."""
    inputs = [t.requires_grad_() for t in scan_inputs(groups=2, seed=chunk)]
    weights = torch.randn(2, 21, 4, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = []
    for scan, kwargs in ((ssd_scan_ref, {}), (ssd_scan_chunked, {"chunk_size": chunk})):
        y, state = scan(*inputs, return_final_state=True, **kwargs)
        grads.append(torch.autograd.grad((y * weights).sum() + state.sum(), inputs))
    for name, got, want in zip("x dt A B C D".split(), grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9, msg=f"gradient of {name}")


def test_chunked_scan_carries_the_state_across_groups_of_chunks():
    """More chunks than the scan takes at once (CHUNKS_AT_ONCE): the state crosses from one group to the next."""
    x, dt, A, B, C, D = scan_inputs(l=150, groups=2, seed=11)
    assert 150 / 4 > 2 * mamba2.CHUNKS_AT_ONCE
    want, want_state = ssd_scan_ref(x, dt, A, B, C, D, return_final_state=True)
    got, got_state = ssd_scan_chunked(x, dt, A, B, C, D, chunk_size=4, return_final_state=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_state, want_state, rtol=0, atol=1e-10)


def test_scans_of_an_empty_sequence():
    x, dt, A, B, C, D = scan_inputs(l=0)
    for y, state in (ssd_scan_ref(x, dt, A, B, C, D, return_final_state=True),
                     ssd_scan_chunked(x, dt, A, B, C, D, chunk_size=4, return_final_state=True)):
        assert y.shape == (2, 0, 4, 3) and state.shape == (2, 4, 3, 5) and not state.any()


def test_chunked_scan_stays_finite_under_strong_decay():
    x, dt, A, B, C, D = scan_inputs(l=40, groups=1)
    dt = dt * 1e3  # exp(dt * A) underflows to 0 over a few tokens: no inf or nan may appear
    y = ssd_scan_chunked(x.float(), dt.float(), A.float(), B.float(), C.float(), D.float(), chunk_size=16)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), ssd_scan_ref(x, dt, A, B, C, D), rtol=1e-4, atol=1e-4)



def test_within_chunks_kernel_equals_pytorch():
    """The numba within-chunk part (inference on CPU) against PyTorch's formulas in float64: each head reads its
    group's scores, nothing above the diagonal, padding (dt = 0) decays and adds nothing, strong decays underflow
    to 0, x read in place from a slice of a wider tensor, the D skip added."""
    from simba_cli.ops.ssd_cpu import within_chunks

    gen = torch.Generator().manual_seed(3)
    b, c, H, Q, P = 2, 3, 6, 16, 5
    a = -torch.rand(b, c, H, Q, generator=gen, dtype=torch.float64) * 2  # 3 groups of 2 heads
    a[0, 1, 2] *= 500
    dt = torch.rand(b, c, H, Q, generator=gen, dtype=torch.float64) + 0.1
    a[1, 0, :, 5:] = dt[1, 0, :, 5:] = 0.0
    scores = torch.randn(b, c, 3, Q, Q, generator=gen, dtype=torch.float64)
    wide = torch.randn(b, c * Q, H * P + 7, generator=gen, dtype=torch.float64)
    x = wide[..., 3:3 + H * P].unflatten(-1, (H, P))  # (b, c Q, H, P), rows H P + 7 apart
    D = torch.randn(H, generator=gen, dtype=torch.float64)
    seg = mamba2._segment_sums(a)
    weights = (torch.exp(seg).unflatten(2, (3, 2)) * scores[:, :, :, None]).flatten(2, 3) * dt[..., None, :]
    xc = x.unflatten(1, (c, Q))  # (b, c, Q, H, P)
    want_y = torch.einsum("bchts,bcshp->bcthp", weights, xc).flatten(1, 2) + D[:, None] * x
    want_u = (xc * (torch.exp(seg[..., -1, :]) * dt).transpose(-1, -2)[..., None]).flatten(1, 2)
    y, u, w_out = within_chunks(a.float(), dt.float(), scores.float(), x.float(), D.float(), 2)
    assert y.dtype == u.dtype == w_out.dtype == torch.float32
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u.double(), want_u, rtol=1e-5, atol=1e-6)
    assert (u[1, :5].abs() > 0).all() and not u[1, 5:Q].any()  # padding adds nothing to the state
    torch.testing.assert_close(w_out.double(), torch.exp(a.cumsum(-1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_out[1, 0, :, 5:], w_out[1, 0, :, 4:5].expand(-1, 11))
    y0, _, _ = within_chunks(a.float(), dt.float(), scores.float(), x.float(), None, 2)  # no skip
    torch.testing.assert_close(y0.double(), want_y - D[:, None] * x, rtol=1e-5, atol=1e-5)


def test_float32_inference_scan_uses_the_kernel_and_equals_the_recurrence(monkeypatch):
    import simba_cli.ops.ssd_cpu as ssd_cpu

    calls = []
    kernel = ssd_cpu.within_chunks
    monkeypatch.setattr(ssd_cpu, "within_chunks", lambda *args: calls.append(1) or kernel(*args))
    x, dt, A, B, C, D = scan_inputs(l=150, groups=2, seed=5)  # 38 chunks of 4, a padded last one: groups of
    # chunks in the buffer, the last group not full
    want, want_state = ssd_scan_ref(x, dt, A, B, C, D, return_final_state=True)
    single = [t.float() for t in (x, dt, A, B, C, D)]
    with torch.no_grad():
        got, got_state = ssd_scan_chunked(*single, chunk_size=4, return_final_state=True)
    at_once = mamba2.INFERENCE_CHUNKS_AT_ONCE
    assert calls == [1] and 150 / 4 > 2 * at_once and -(-150 // 4) % at_once
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_state.double(), want_state, rtol=1e-4, atol=1e-4)
    y = ssd_scan_chunked(*[t.requires_grad_() for t in single], chunk_size=4)  # training: PyTorch's path
    assert calls == [1] and y.requires_grad
    torch.testing.assert_close(y.detach(), got)

def hf_mamba2_oracle(tmp_path, n_groups=1, chunk_size=8, tie=False, name="oracle"):
    """A random tiny transformers Mamba2ForCausalLM, its norms, D, biases and A_log perturbed, saved in its format."""
    # Without mamba-ssm and causal-conv1d, transformers runs its pure-PyTorch path: the oracle.
    assert importlib.util.find_spec("mamba_ssm") is None and importlib.util.find_spec("causal_conv1d") is None
    torch.manual_seed(n_groups)
    cfg = HFMamba2Config(hidden_size=32, num_heads=4, head_dim=16, state_size=8, n_groups=n_groups,
                         num_hidden_layers=2, vocab_size=64, chunk_size=chunk_size, use_bias=True,
                         tie_word_embeddings=tie)
    oracle = Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for param_name, p in oracle.named_parameters():
            if "norm" in param_name or param_name.endswith((".D", "A_log")) or "bias" in param_name:
                p.add_(0.2 * torch.randn_like(p))
    oracle.save_pretrained(tmp_path / name)
    return oracle, tmp_path / name


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out if torch.is_tensor(out) else out.logits


IDS = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("n_groups", [1, 2])
def test_logits_equal_transformers(tmp_path, n_groups, monkeypatch, projections):
    oracle, directory = hf_mamba2_oracle(tmp_path, n_groups=n_groups)
    ours = load_mamba2(directory).eval()
    assert (ours.cfg.n_heads, ours.cfg.n_groups, ours.cfg.chunk_size) == (4, n_groups, 8)
    want = logits(oracle, IDS)
    # The block length changes the computation, not the result: 19 tokens in one block and in blocks of 5 and 7
    # (on CPU the model takes CPU_CHUNK_SIZE, whatever the checkpoint's chunk_size, which it keeps).
    for chunk in (mamba2.CPU_CHUNK_SIZE, 5, 7):
        monkeypatch.setattr(mamba2, "CPU_CHUNK_SIZE", chunk)
        assert mamba2.scan_chunk_size(ours.cfg, torch.device("cpu")) == chunk
        assert mamba2.scan_chunk_size(ours.cfg, torch.device("cuda")) == 8
        torch.testing.assert_close(logits(ours, IDS), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_saved_model_loads_in_transformers(tmp_path, tie):
    oracle, directory = hf_mamba2_oracle(tmp_path, n_groups=2, tie=tie)
    ours = load_mamba2(directory).eval()
    saved = save_mamba2(ours, tmp_path / "ours")
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "mamba2" and config["num_heads"] == 4 and config["tie_word_embeddings"] is tie
    again = Mamba2ForCausalLM.from_pretrained(saved).eval()
    torch.testing.assert_close(logits(again, IDS), logits(oracle, IDS), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load_mamba2(saved).eval(), IDS), logits(ours, IDS))
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        save_mamba2(ours, saved)


def test_weights_that_do_not_fit_raise(tmp_path):
    _, directory = hf_mamba2_oracle(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["state_size"] = 16
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"does not fit its config.json: shape mismatch .*in_proj.weight"):
        load_mamba2(directory)
    config.update(state_size=8, num_hidden_layers=3)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"missing keys backbone.layers.2"):
        load_mamba2(directory)
    config.update(num_hidden_layers=2, num_heads=3)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="num_heads 3 × head_dim 16 != expand × hidden_size 64"):
        load_mamba2(directory)
    config.update(num_heads=4, model_type="mamba")
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="model_type 'mamba', not 'mamba2'"):
        load_mamba2(directory)
    (directory / "model.safetensors").unlink()
    config["model_type"] = "mamba2"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="no weights in"):
        load_mamba2(directory)


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
