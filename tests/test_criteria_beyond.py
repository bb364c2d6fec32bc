"""The criteria beyond the paper against brute force: dy_T'(t) = y_T'(full) - y_T'(u_t = 0), by rerunning the
reference scan with one token's input zeroed, in float64 on right-padded batches of both families."""

import math

import pytest
import torch

from simba_cli.errors import UserError
from simba_cli.models.mamba2 import SSDScanInputs, ssd_scan_ref
from simba_cli.ops.scan_ref import selective_scan_ref
from simba_cli.simba.criteria import LayerView, score, simba_score_reference
from simba_cli.simba.criteria_beyond import parse_variant, variant_score
from simba_cli.simba.flops import criterion_flops_per_token
from simba_cli.simba.pruned import select
from tests.conftest import tiny_config
from tests.test_mamba2_simba import layer_scan as ssd_layer
from tests.test_simba import layer_scan as mamba_layer

LENGTHS = (13, 8)


def scan_of(family, dtype=torch.float64, lengths=LENGTHS, seed=0):
    if family == "mamba":
        return mamba_layer(dtype, lengths, seed)
    s = ssd_layer(lengths=lengths, seed=seed)
    return SSDScanInputs(s["x"], s["dt"], s["A"], s["B"], s["C"], s["z"]), s["lengths"]


def brute_outputs(scan, b: int, n: int) -> torch.Tensor:
    """(t, T', channels): y_T'(full) - y_T'(input t zeroed), for one unpadded sequence; no skip term."""
    if isinstance(scan, SSDScanInputs):
        args = lambda x: (x, scan.dt[b:b + 1, :n], scan.A, scan.B[b:b + 1, :n], scan.C[b:b + 1, :n])
        x0 = scan.x[b:b + 1, :n]
        full = ssd_scan_ref(*args(x0))[0].flatten(1)
        rows = []
        for t in range(n):
            cut = x0.clone()
            cut[:, t] = 0
            rows.append(full - ssd_scan_ref(*args(cut))[0].flatten(1))
        return torch.stack(rows)
    args = lambda u: (u, scan.dt[b:b + 1, :n], scan.A, scan.B[b:b + 1, :n], scan.C[b:b + 1, :n])
    u0 = scan.u[b:b + 1, :n]
    full = selective_scan_ref(*args(u0))[0]
    rows = []
    for t in range(n):
        cut = u0.clone()
        cut[:, t] = 0
        rows.append(full - selective_scan_ref(*args(cut))[0])
    return torch.stack(rows)


def view(scan, lengths, protected=None, keep=None):
    b, l = lengths.shape[0], int(lengths.max())
    last = torch.arange(l)[None, :] == lengths[:, None] - 1
    caller = torch.zeros(b, dtype=torch.bool) if protected is None else protected.any(1)
    prot = last if protected is None else protected | last
    keep = lengths if keep is None else keep
    return LayerView(scan, torch.zeros(b, l, 4), lengths, keep, 1, protected=prot, caller_protected=caller)


def exact(spec, scan, lengths, protected=None):
    """The variant's scores in the scan's own dtype (`score` hands float32 to the selection)."""
    v = view(scan, lengths, protected)
    return variant_score(spec, scan, lengths, v.keep, v.protected, v.caller_protected)


def windows(lengths, W):
    """Sequence 0: the caller protects positions 4 and 9 (the window is those and the last token); sequence
    1: nothing protected, the window is its last W tokens (W > 3: the two windows differ in size, so the
    shorter is padded by repeating a position, which must count once)."""
    l = int(lengths.max())
    protected = torch.zeros(len(lengths), l, dtype=torch.bool)
    protected[0, [4, 9]] = True
    n1 = int(lengths[1])
    return protected, [[4, 9, int(lengths[0]) - 1], list(range(max(0, n1 - W), n1))]


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("reduce", ["mean", "max"])
@torch.no_grad()
def test_windowed_simba_equals_brute_force(family, reduce):
    scan, lengths = scan_of(family)
    protected, window = windows(lengths, W=5)
    assert len(window[0]) != len(window[1])
    got = exact(f"simba-window:5:{reduce}", scan, lengths, protected)
    for b, n in enumerate(lengths.tolist()):
        dy = brute_outputs(scan, b, n)[:, window[b]]  # (t, |M|, channels), zero where T' < t
        if reduce == "mean":
            want = dy.mean(1).amax(-1)
        else:
            causal = torch.arange(n)[:, None] <= torch.tensor(window[b])[None, :]
            want = dy.amax(-1).masked_fill(~causal, -math.inf).amax(1)
        torch.testing.assert_close(got[b, :n].double(), want, rtol=1e-9, atol=1e-12)
        assert torch.isinf(got[b, n:]).all()


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@torch.no_grad()
def test_channel_selective_simba_equals_brute_force(family):
    scan, lengths = scan_of(family)
    dt = scan.dt.double()
    for b, n in enumerate(lengths.tolist()):
        # each channel's decay over the context, by hand: the share of token 0's state left at T, slowest state
        rate = scan.A.double().amax(1) if family == "mamba" else scan.A.double()
        decay = torch.exp(rate * dt[b, 1:n].sum(0))  # (D,) or (H,)
        ranked = decay.sort().values
        mid = ranked.numel() // 2
        threshold = float((ranked[mid - 1] * ranked[mid]).sqrt())  # between two channels: no tie at the bar
        use = decay >= threshold
        assert 0 < int(use.sum()) < use.numel()
        got = exact(f"simba-channels:{threshold!r}", scan, lengths)[b, :n]
        dy = brute_outputs(scan, b, n)[:, n - 1]  # (t, channels)
        per_channel = use if family == "mamba" else use.repeat_interleave(dy.shape[1] // use.numel())
        torch.testing.assert_close(got.double(), dy[:, per_channel].amax(-1), rtol=1e-9, atol=1e-12)
    # a threshold no channel reaches reads the slowest channel alone
    scan1, lengths1 = scan_of(family, lengths=(13,))
    rate = scan1.A.double().amax(1) if family == "mamba" else scan1.A.double()
    slowest = int((rate * scan1.dt[0, 1:].double().sum(0)).argmax())
    dy = brute_outputs(scan1, 0, 13)[:, 12]
    cols = [slowest] if family == "mamba" else list(range(slowest * 4, slowest * 4 + 4))
    torch.testing.assert_close(exact("simba-channels:1.0", scan1, lengths1)[0].double(),
                               dy[:, cols].amax(-1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@torch.no_grad()
def test_split_budget_keeps_the_recent_share_then_the_best_simba(family):
    scan, lengths = scan_of(family)
    keep = torch.tensor([8, 5])
    scores = score("simba-split:0.5", view(scan, lengths, keep=keep))
    protected = torch.arange(13)[None, :] == lengths[:, None] - 1
    idx, _ = select(scores, lengths, keep, protected)
    for b, n in enumerate(lengths.tolist()):
        k = int(keep[b])
        recent = round(k * 0.5)
        kept = idx[b, :k].tolist()
        simba = brute_outputs(scan, b, n)[:, n - 1].amax(-1)  # Simba's score, by brute force
        rest = list(range(n - recent))
        best = sorted(rest, key=lambda t: -float(simba[t]))[:k - recent]
        assert kept == sorted(best + list(range(n - recent, n)))


@torch.no_grad()
def test_the_cpu_kernel_serves_the_variants():
    """float32 on CPU runs the numba kernel (weights per channel, a start, a channel mask): it agrees with
    the float64 reference formula."""
    for spec in ("simba-window:5:mean", "simba-window:4:max", "simba-channels:0.3"):
        s64, lengths = scan_of("mamba", lengths=(40, 23), seed=1)
        s32, _ = scan_of("mamba", torch.float32, lengths=(40, 23), seed=1)
        protected = torch.zeros(2, 40, dtype=torch.bool)
        protected[0, [30, 35]] = True
        ref = score(spec, view(s64, lengths, protected))
        got = score(spec, view(s32, lengths, protected))
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(got)), spec
        torch.testing.assert_close(got[finite], ref[finite], rtol=1e-3, atol=1e-6)


def test_windowed_simba_is_simba_when_the_window_is_the_last_token():
    scan, lengths = scan_of("mamba")
    want = simba_score_reference(scan.u, scan.dt, scan.A, scan.B, scan.C, lengths - 1)
    for reduce in ("mean", "max"):
        torch.testing.assert_close(exact(f"simba-window:1:{reduce}", scan, lengths), want, rtol=1e-12, atol=0)


@torch.no_grad()
def test_window_is_stable_on_long_sequences_with_large_steps():
    """Every exponent is <= 0: at 2000 tokens with step sizes of up to 1 and A up to 10x its size, the
    float32 kernel's scores are finite and equal the float64 reference's (terms below 2^-64 of the largest
    aside)."""
    scan, lengths = scan_of("mamba", torch.float64, lengths=(60,))
    n = 2000
    rep = lambda x: x.repeat(1, math.ceil(n / 60), 1)[:, :n].contiguous()
    big = type(scan)(rep(scan.u), rep(scan.dt) * 10, scan.A * 10, rep(scan.B), rep(scan.C), rep(scan.z))
    f32 = type(scan)(*(x.float() for x in (big.u, big.dt, big.A, big.B, big.C, big.z)))
    for spec in ("simba-window", "simba-window:8:max", "simba-channels"):
        ref = score(spec, view(big, torch.tensor([n])))
        got = score(spec, view(f32, torch.tensor([n])))
        assert torch.isfinite(got).all(), spec
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-6 * float(ref.abs().max()))


def test_options_parse_and_bad_ones_fail_in_one_line():
    assert parse_variant("simba-window").window == 32
    v = parse_variant("simba-window:64:max")
    assert (v.window, v.reduce) == (64, "max")
    assert parse_variant("simba-split:0.25").share == 0.25
    assert parse_variant("simba-channels:0.01").threshold == 0.01
    assert parse_variant("simba") is None
    from simba_cli.simba.settings import PruneConfig

    for bad, msg in [("simba-window:0", "at least 1"), ("simba-window:8:median", "unknown reduction"),
                     ("simba-split:2", r"\[0, 1\]"), ("simba-channels:x", "must be a number"),
                     ("simba-window:1:2:3", "too many"), ("simba:3", "unknown criterion")]:
        with pytest.raises(UserError, match=msg):
            PruneConfig(criterion=bad)


def test_the_window_max_counts_the_passes_it_ran():
    """Measured FLOPs: the window's max runs one Simba pass per window position: the caller's protected
    positions (here 3, with the last token) however large W is."""
    from simba_cli.simba.pruned import pruned_forward
    from simba_cli.simba.settings import PruneConfig
    from tests.conftest import random_model

    model = random_model(tiny_config(n_layer=3), seed=2)
    ids = torch.randint(0, 64, (1, 40))
    protected = torch.zeros(1, 40, dtype=torch.bool)
    protected[0, [20, 30]] = True
    with torch.no_grad():
        mx = pruned_forward(model, ids, PruneConfig(final_keep=0.3, criterion="simba-window:8:max"), None, protected)
        one = pruned_forward(model, ids, PruneConfig(final_keep=0.3, criterion="simba"), None, protected)
    assert mx.flops.criterion[:2] == [3 * f for f in one.flops.criterion[:2]] and one.flops.criterion[0] > 0


def test_mamba2_window_counts_the_positions_it_summed():
    """On Mamba-2 the window's mean, like its max, runs one pass per window position: the caller's protected
    positions (40 here, not W = 4) in the measured count; without protection the analytic count charges the
    last W tokens, fewer where a layer has fewer than W, and equals the measured one."""
    from simba_cli.simba.flops import analytic
    from simba_cli.simba.pruned import pruned_forward
    from simba_cli.simba.settings import PruneConfig
    from tests.conftest import random_mamba2, tiny_mamba2_config

    model = random_mamba2(tiny_mamba2_config(n_layer=6), seed=1)
    ids = torch.randint(0, 64, (1, 100))
    protected = torch.zeros(1, 100, dtype=torch.bool)
    protected[0, 60:] = True
    with torch.no_grad():
        one = pruned_forward(model, ids, PruneConfig(final_keep=0.5, criterion="simba"), None, protected)
        for reduce in ("mean", "max"):
            run = pruned_forward(model, ids, PruneConfig(final_keep=0.5, criterion=f"simba-window:4:{reduce}"),
                                 None, protected)
            assert run.flops.criterion[:3] == [40 * f for f in one.flops.criterion[:3]] and one.flops.criterion[0]
        short = torch.randint(0, 64, (1, 57))
        for spec in ("simba-window:32:mean", "simba-window:32:max"):
            config = PruneConfig(final_keep=0.2, criterion=spec)
            measured = pruned_forward(model, short, config, None).flops
            planned = analytic(model.cfg, 57, config.keep_ratios(6), spec)
            assert measured.criterion == planned.criterion and measured.tokens_in[3:5] == [30, 21]


def test_kept_tokens_do_not_depend_on_the_batch():
    """A sequence keeps the same tokens alone and in a padded batch, for `uniform` beside caller-protected
    positions off its grid, and where scores tie (the later token wins)."""
    from simba_cli.simba.pruned import pruned_forward
    from simba_cli.simba.settings import PruneConfig
    from tests.conftest import random_mamba2, tiny_mamba2_config

    model = random_mamba2(tiny_mamba2_config(n_layer=3), seed=3)
    lengths = torch.tensor([45, 30, 7])
    ids = torch.randint(0, 64, (3, 45), generator=torch.Generator().manual_seed(0))
    protected = torch.zeros(3, 45, dtype=torch.bool)
    protected[0, [3, 17, 18, 40, 44]] = protected[1, [2, 5, 11, 12, 29]] = True
    protected[2, 6] = True
    config = PruneConfig(final_keep=0.2, criterion="uniform")
    with torch.no_grad():
        batch = pruned_forward(model, ids, config, lengths, protected, trace=True)
        alone = pruned_forward(model, ids[1:2, :30], config, None, protected[1:2, :30], trace=True)
    for got, want in zip(batch.kept, alone.kept):
        assert got[1][got[1] >= 0].tolist() == want[0][want[0] >= 0].tolist()
    # a NaN score ranks last among real tokens, never below padding
    idx, _ = select(torch.tensor([[1.0, float("nan"), 2.0, float("nan"), 0.0, 0.0]]), torch.tensor([4]),
                    torch.tensor([3]), torch.zeros(1, 6, dtype=torch.bool))
    assert idx.tolist() == [[0, 2, 3]]
    scores = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.5, 0.0]])
    for width in (6, 9):
        padded = torch.nn.functional.pad(scores, (0, width - 6))
        idx, _ = select(padded, torch.tensor([6]), torch.tensor([3]), torch.zeros(1, width, dtype=torch.bool))
        assert idx.tolist() == [[1, 4, 5]]


def test_variant_flops_count_simba_passes():
    cfg = tiny_config(d_model=16)
    simba = criterion_flops_per_token(cfg, "simba")
    assert criterion_flops_per_token(cfg, "simba-window") == simba
    assert criterion_flops_per_token(cfg, "simba-window:8:max") == 8 * simba
    assert criterion_flops_per_token(cfg, "simba-split:0.3") == simba
    assert criterion_flops_per_token(cfg, "simba-channels") == simba + 2 * cfg.d_inner
    # Mamba-2 runs the window's mean position by position too (no closed form there): W passes
    from simba_cli.models.mamba2_config import Mamba2Config

    ssd = Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=8, head_dim=8, n_groups=2)
    one = criterion_flops_per_token(ssd, "simba")
    assert one == 2 * 2 * 8 + 4 * ssd.n_heads + 2 * ssd.d_inner
    for spec in ("simba-window:6:mean", "simba-window:6:max"):
        assert criterion_flops_per_token(ssd, spec) == 6 * one
