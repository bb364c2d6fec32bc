"""The Simba core: criterion vs brute force, schedules, the pruned forward vs dense layers, FLOPs by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from simba_cli.errors import UserError
from simba_cli.models.decode import generate
from simba_cli.models.mamba2 import SSDScanInputs
from simba_cli.ops.scan_ref import selective_scan_ref
from simba_cli.simba.criteria import simba_contributions, simba_score, simba_score_reference
from simba_cli.simba.criteria_ssd import ssd_contributions, ssd_score
from simba_cli.simba.flops import analytic, dense_flops_per_token
from simba_cli.simba.pruned import pruned_forward, pruned_prefill
from simba_cli.simba.settings import DENSE, PruneConfig, check_seq_len, mean_keep
from tests.conftest import random_model, tiny_config, tiny_model_of

FAMILIES = ["mamba", "mamba2"]


def layer_scan(dtype=torch.float64, lengths=(13, 8), seed=0):
    model = random_model(tiny_config(d_model=16), seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(len(lengths), max(lengths), 16, generator=g, dtype=torch.float64).to(dtype)
    lengths = torch.tensor(lengths)
    with torch.no_grad():
        return model.layers[1].mixer.mix(h, lengths, keep_scan_inputs=True).scan, lengths


@torch.no_grad()
def test_criterion_equals_brute_force():
    """dy_T(t) = y_T(full) - y_T(u_t = 0), the scan being linear in u; float64."""
    scan, lengths = layer_scan()
    dt = scan.dt
    contrib = simba_contributions(scan.u, dt, scan.A, scan.B, scan.C, lengths - 1)
    for b, n in enumerate(lengths.tolist()):
        T = n - 1
        args = lambda u, b=b, n=n: (u, dt[b:b + 1, :n], scan.A, scan.B[b:b + 1, :n], scan.C[b:b + 1, :n])
        full = selective_scan_ref(*args(scan.u[b:b + 1, :n]))[0, T]
        for t in range(T):  # at t = T the skip term D u_T would differ; T is never pruned anyway
            u = scan.u[b:b + 1, :n].clone()
            u[:, t] = 0
            brute = full - selective_scan_ref(*args(u))[0, T]
            torch.testing.assert_close(contrib[b, t], brute, rtol=1e-9, atol=1e-12)
            assert contrib[b, t].max() == pytest.approx(
                simba_score_reference(scan.u, dt, scan.A, scan.B, scan.C, lengths - 1)[b, t].item(), rel=1e-12)
    assert torch.isinf(simba_score_reference(scan.u, dt, scan.A, scan.B, scan.C, lengths - 1)[1, 8:]).all()


@torch.no_grad()
def test_keeping_scan_inputs_leaves_the_layer_unchanged():
    """The scoring layer hands its dt to the scan: same output bit for bit, and dt is the scan's step size."""
    model = random_model(tiny_config(d_model=16), seed=3)
    h = torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([11, 6])
    mixer = model.layers[1].mixer
    kept = mixer.mix(h, lengths, keep_scan_inputs=True)
    assert torch.equal(kept.out, mixer.mix(h, lengths).out)
    delta = F.linear(kept.scan.u @ mixer.x_proj.weight.t()[:, :mixer.cfg.dt_rank], mixer.dt_proj.weight)
    expect = F.softplus(delta + mixer.dt_proj.bias) * (torch.arange(11)[None, :, None] < lengths[:, None, None])
    torch.testing.assert_close(kept.scan.dt, expect)


@pytest.mark.parametrize("variant", ["simba", "simba-abs", "simba-gated"])
@torch.no_grad()
def test_cpu_score_kernel_matches_reference(variant):
    scan64, lengths = layer_scan(lengths=(40, 23), seed=1)
    ref = simba_score(scan64, lengths, variant)  # float64 goes to the reference formula
    scan32, _ = layer_scan(torch.float32, lengths=(40, 23), seed=1)
    got = simba_score(scan32, lengths, variant)  # float32 on CPU goes to the numba kernel
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite].double(), ref[finite], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("variant", ["simba", "simba-abs", "simba-gated"])
@torch.no_grad()
def test_triton_score_kernel_matches_the_criterion(variant):
    """The fused kernel (interpreted on CPU) on a real layer's scan quantities, against the criterion."""
    from simba_kernels.simba_score import simba_score as triton_score

    scan, lengths = layer_scan(lengths=(40, 23), seed=2)
    ref = simba_score(scan, lengths, variant)
    gate_T = F.silu(scan.z[torch.arange(2), lengths - 1]) if variant == "simba-gated" else None
    got = triton_score(scan.u, scan.dt, scan.A, scan.B, scan.C, lengths - 1,
                       absolute=variant == "simba-abs", gate_T=gate_T)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite].double(), ref[finite], rtol=1e-3, atol=1e-6)


# --- schedules ---------------------------------------------------------------------------------------

def test_linear_schedule_values():
    r = PruneConfig("linear", 0.1).keep_ratios(24)
    assert r[0] == 1.0 and r[-1] == pytest.approx(0.1)
    assert mean_keep(r) == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(r, r[1:]))
    r = PruneConfig("linear", 0.1, first_layer=4).keep_ratios(24)
    assert r[:4] == [1.0] * 4 and r[4] == pytest.approx(1 - 0.9 / 20) and r[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "step"])
@pytest.mark.parametrize("n_layer", [10, 3, 2])
def test_schedules_are_monotone_and_end_at_final_keep(kind, n_layer):
    """Also with fewer layers after the first than steps (3 stages over 1 or 2 layers)."""
    r = PruneConfig(kind, 0.2, stages=3).keep_ratios(n_layer)
    assert r[0] == 1.0 and r[-1] == pytest.approx(0.2)
    assert all(a >= b - 1e-12 for a, b in zip(r, r[1:]))


def test_schedule_values_by_hand():
    """10 layers, final_keep 0.2, from layer 1 (9 layers prune, x = l / 9): cosine 0.2 + 0.4 (1 + cos(pi x));
    step with 3 stages: layers 1-3 keep 1 - 0.8/3, 4-6 1 - 1.6/3, 7-9 0.2; constant 0.2 after layer 0."""
    cosine = PruneConfig("cosine", 0.2).keep_ratios(10)
    assert cosine == pytest.approx([1.0] + [0.2 + 0.4 * (1 + math.cos(math.pi * l / 9)) for l in range(1, 10)])
    step = PruneConfig("step", 0.2, stages=3).keep_ratios(10)
    assert step == pytest.approx([1.0] + [1 - 0.8 / 3] * 3 + [1 - 1.6 / 3] * 3 + [0.2] * 3)
    assert PruneConfig("constant", 0.2).keep_ratios(10) == pytest.approx([1.0] + [0.2] * 9)
    # 4 stages over 2 pruning layers: each layer its own step, the last at final_keep
    assert PruneConfig("step", 0.2, stages=4).keep_ratios(3) == pytest.approx([1.0, 0.6, 0.2])


@pytest.mark.parametrize("kw,msg", [
    (dict(schedule="zigzag"), "unknown schedule"), (dict(final_keep=0), r"final_keep must be a number in \(0, 1\]"),
    (dict(final_keep=1.5), r"final_keep must be a number in \(0, 1\]"), (dict(first_layer=0), "first_layer"),
    (dict(final_keep="0.1"), "final_keep must be a number"), (dict(stages=2.5), "stages must be an integer"),
])
def test_invalid_schedules(kw, msg):
    with pytest.raises(UserError, match=msg):
        PruneConfig(**kw)


def test_one_prune_type_from_every_source():
    """The CLI's options, a recipe's or artifact's mapping and lm-eval's strings all give the same PruneConfig."""
    want = PruneConfig("linear", 0.3, first_layer=2, criterion="recent")
    assert PruneConfig.from_mapping({"final_keep": 0.3, "first_layer": 2, "criterion": "recent"}, "recipe") == want
    strings = {"final_keep": "0.3", "first_layer": "2", "criterion": "recent"}
    assert PruneConfig.from_mapping(strings, "model_args", strings=True) == want
    assert DENSE.override(final_keep=0.3, first_layer=2, criterion="recent", stages=None) == want  # implies linear
    assert DENSE.override() == DENSE and want.override(schedule="none").dense
    with pytest.raises(UserError, match="schedule none runs the dense model, so final_keep would have no effect"):
        DENSE.override(schedule="none", final_keep=0.5)  # recorded, yet without effect: refused
    assert want.override(final_keep=0.1).first_layer == 2  # an artifact's own settings stay unless given
    assert want.label() == "recent 0.3 from 2" and DENSE.label() == "dense"
    assert want.key() != want.override(final_keep=0.1).key() and want.key() == want.override(mode="protect").key()
    assert want.mean_keep(24) == pytest.approx(mean_keep(want.keep_ratios(24)))
    with pytest.raises(UserError, match=r"model_args\.final_keep must be float, got 'most'"):
        PruneConfig.from_mapping({"final_keep": "most"}, "model_args", strings=True)
    with pytest.raises(UserError, match=r"recipe: unknown key 'keep'"):
        PruneConfig.from_mapping({"keep": 0.1}, "recipe")


def test_unknown_criterion_and_short_sequences():
    with pytest.raises(UserError, match="unknown criterion 'magic'"):
        PruneConfig(criterion="magic")
    with pytest.raises(UserError, match="too short"):
        check_seq_len(PruneConfig(final_keep=0.1), 24, seq_len=20, n_protected=4)
    check_seq_len(PruneConfig(final_keep=0.1), 24, seq_len=2048, n_protected=64)


# --- the pruned forward -------------------------------------------------------------------------------

def dense_on_gathered(model, ids, kept, criterion="random", forced=(), caller=False):
    """Reference: run each dense block on the gathered sequence the trace says it saw; exits by hand.
    For `simba` and `recent` it also checks the trace's choice of tokens for the next layer: the forced
    positions (protected, and the last token) plus the best of the rest, by the float64 brute-force-checked
    reference score on this very layer, or by recency."""
    hidden, residual = model.embed(ids[None]), None
    final = {}
    for i, block in enumerate(model.layers):
        cur = kept[i]
        out, residual = block(hidden, residual, keep_scan_inputs=True)
        hidden = out.out
        stream = hidden + residual
        nxt = kept[i + 1] if i + 1 < len(kept) else torch.tensor([], dtype=torch.long)
        for j, p in enumerate(cur.tolist()):
            if i + 1 == len(kept) or p not in nxt.tolist():
                final[p] = stream[0, j]
        if i + 1 < len(kept):
            check_choice(criterion, out.scan, cur.tolist(), set(nxt.tolist()), set(forced), caller)
            local = torch.tensor([cur.tolist().index(p) for p in nxt.tolist()])
            hidden, residual = hidden[:, local], residual[:, local]
    return model.logits_from_stream(torch.stack([final[p] for p in sorted(final)]))


def check_choice(criterion, scan, cur: list[int], chosen: set[int], forced: set[int], caller: bool = False):
    forced = forced & set(cur)
    assert forced <= chosen
    rest = [j for j, p in enumerate(cur) if p not in forced]
    picked = [j for j in rest if cur[j] in chosen]
    dropped = [j for j in rest if cur[j] not in chosen]
    if criterion == "recent":
        assert not picked or not dropped or min(picked) > max(dropped)
    elif criterion in ("simba", "simba-window:4") and picked and dropped:
        if criterion == "simba":
            score = reference_score(scan, len(cur))
        else:  # the window: the caller's protected positions (and the last) where it gave some, else the last 4
            window = [j for j, p in enumerate(cur) if p in forced] if caller else list(range(len(cur)))[-4:]
            score = reference_window_score(scan, len(cur), window)
        assert score[picked].min() >= score[dropped].max() - 1e-5 * score.abs().max()


def reference_score(scan, n: int) -> torch.Tensor:
    """The float64 Simba score of one unpadded sequence of n tokens, by the brute-force-checked formula of its
    family: Mamba-1's reference, or the SSD one (`tests.test_mamba2_simba`)."""
    f64 = lambda x: x.double()
    if isinstance(scan, SSDScanInputs):
        return ssd_score(f64(scan.x), f64(scan.dt), f64(scan.A), f64(scan.B), f64(scan.C), torch.tensor([n]))[0]
    return simba_score_reference(f64(scan.u), f64(scan.dt), f64(scan.A), f64(scan.B), f64(scan.C),
                                 torch.tensor([n - 1]))[0]


def reference_window_score(scan, n: int, window: list[int]) -> torch.Tensor:
    """The float64 windowed Simba score (mean) of one unpadded sequence: Simba's brute-force-checked
    contributions to each window position's output, averaged over the window, maximum over channels."""
    f64 = lambda x: x.double()
    rows = []
    for T in window:
        if isinstance(scan, SSDScanInputs):
            c = ssd_contributions(f64(scan.x), f64(scan.dt), f64(scan.A), f64(scan.B), f64(scan.C),
                                  torch.tensor([T + 1]))[0, :n].flatten(1)
        else:
            c = simba_contributions(f64(scan.u), f64(scan.dt), f64(scan.A), f64(scan.B), f64(scan.C),
                                    torch.tensor([T]))[0, :n]
        rows.append(c)
    return torch.stack(rows).mean(0).amax(-1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", ["simba", "recent", "random", "simba-window:4", "simba-split", "simba-channels"])
def test_pruned_forward_equals_dense_layers_on_gathered_sequence(criterion, family):
    model = tiny_model_of(family, n_layer=4)
    ids = torch.randint(0, 64, (2, 30))
    lengths = torch.tensor([30, 19])
    protected = torch.zeros(2, 30, dtype=torch.bool)
    protected[0, 3] = True
    with torch.no_grad():
        out = pruned_forward(model, ids, PruneConfig(final_keep=0.2, criterion=criterion), lengths, protected,
                             trace=True)
        for b, n in enumerate(lengths.tolist()):
            kept = [k[b][k[b] >= 0] for k in out.kept]
            for k in kept:
                assert torch.equal(k, k.sort().values), "kept tokens stay in order"
                assert n - 1 in k.tolist(), "the last real token is never pruned"
            if b == 0:
                assert all(3 in k.tolist() for k in kept), "protected positions are never pruned"
            assert [len(k) for k in kept] == out.tokens_per_layer[:, b].tolist()
            assert len(kept[-1]) < len(kept[0])
            ref = dense_on_gathered(model, ids[b, :n], kept, criterion, forced=[n - 1] + ([3] if b == 0 else []),
                                    caller=b == 0)
            torch.testing.assert_close(out.logits[b, :n], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_schedule_none_is_the_dense_model_bit_for_bit(family):
    model = tiny_model_of(family)
    ids = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        out = pruned_forward(model, ids, PruneConfig(schedule="none"))
        assert torch.equal(out.logits, model(ids))
        protected = torch.zeros(2, 17, dtype=torch.bool)
        protected[:, 12:] = True
        prot = pruned_forward(model, ids, PruneConfig(schedule="none", mode="protect"), protected=protected)
        torch.testing.assert_close(prot.logits, model(ids)[:, 12:], rtol=1e-6, atol=1e-6)
        assert prot.positions[0].tolist() == list(range(12, 17))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", ["simba", "random", "simba-window:4", "simba-window:4:max", "simba-split",
                                       "simba-channels"])
def test_each_sequence_of_a_padded_batch_equals_itself_alone(criterion, family):
    model = tiny_model_of(family, n_layer=4)
    ids = torch.randint(0, 64, (3, 26))
    lengths = torch.tensor([26, 11, 20])
    cfg = PruneConfig(final_keep=0.3, criterion=criterion)
    with torch.no_grad():
        batched = pruned_forward(model, ids, cfg, lengths, trace=True)
        for b, n in enumerate(lengths.tolist()):
            alone = pruned_forward(model, ids[b:b + 1, :n], cfg, trace=True)
            torch.testing.assert_close(batched.logits[b, :n], alone.logits[0], rtol=1e-4, atol=1e-4)
            assert batched.tokens_per_layer[:, b].tolist() == alone.tokens_per_layer[:, 0].tolist()
            assert batched.kept[-1][b, :len(alone.kept[-1][0])].tolist() == alone.kept[-1][0].tolist()


def test_random_draws_differ_between_sequences_and_seeds():
    model = random_model(tiny_config(n_layer=4))
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        kept = lambda x, seed: pruned_forward(model, x, PruneConfig(final_keep=0.3, criterion="random", seed=seed),
                                              trace=True).kept[-1][0].tolist()
        first = kept(ids, 0)
        assert kept(ids, 0) == first  # reproducible
        assert kept(ids, 1) != first  # another seed, another draw
        assert kept(torch.randint(0, 64, (1, 40)), 0) != first  # another sequence, another draw


@pytest.mark.parametrize("family", FAMILIES)
def test_protect_mode_scores_only_protected_positions(family):
    model = tiny_model_of(family, n_layer=4)
    ids = torch.randint(0, 64, (2, 24))
    protected = torch.zeros(2, 24, dtype=torch.bool)
    protected[0, 20:] = True
    protected[1, 10:12] = True
    with torch.no_grad():
        out = pruned_forward(model, ids, PruneConfig(final_keep=0.25, mode="protect"), protected=protected)
        full = pruned_forward(model, ids, PruneConfig(final_keep=0.25), protected=protected)
    assert out.positions[0].tolist() == [20, 21, 22, 23]
    assert out.positions[1, :3].tolist() == [10, 11, 23] and out.valid[1].tolist() == [True, True, True, False]
    # Protected positions run at full depth, the same in both modes.
    torch.testing.assert_close(out.logits[0], full.logits[0, 20:], rtol=1e-5, atol=1e-5)
    assert out.flops.head_positions == 7


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_prefill_then_decoding(family):
    model = tiny_model_of(family, n_layer=4)
    ids = torch.randint(0, 64, (2, 20))
    dense = generate(model, ids, 6)
    none = generate(model, ids, 6, prefill_fn=pruned_prefill(PruneConfig(schedule="none")))
    assert torch.equal(dense, none)
    pruned = generate(model, ids, 6, prefill_fn=pruned_prefill(PruneConfig(final_keep=0.3)))
    assert pruned.shape == (2, 6)


# --- FLOPs ---------------------------------------------------------------------------------------------

def test_flops_of_official_configs_by_hand():
    from simba_cli.models.config import OFFICIAL

    # mamba-130m, per token and layer: norm 4*768 = 3,072; in_proj 2*768*3072 = 4,718,592;
    # conv 2*1536*4 = 12,288; x_proj 2*1536*(48+32) = 245,760; dt_proj 2*48*1536 = 147,456;
    # scan 9*1536*16 = 221,184; out_proj 2*1536*768 = 2,359,296  -> 7,707,648 per layer, x 24.
    # Head: 4*768 + 2*768*50280 = 77,233,152.
    assert dense_flops_per_token(OFFICIAL["mamba-130m"]) == 24 * 7_707_648 + 77_233_152
    # mamba-2.8b: d 2560, D 5120, R 160: 10,240 + 52,428,800 + 40,960 + 2*5120*192 = 1,966,080
    # + 2*160*5120 = 1,638,400 + 9*5120*16 = 737,280 + 26,214,400 = 83,036,160 per layer, x 64.
    # Head: 4*2560 + 2*2560*50280 = 257,443,840.
    assert dense_flops_per_token(OFFICIAL["mamba-2.8b"]) == 64 * 83_036_160 + 257_443_840


def test_pruned_flops_of_mamba_130m_by_hand():
    """Linear to 0.1 from layer 1 at L = 2048: layer l sees ceil(2048 (1 - 0.9 l / 23)) tokens,
    2048, 1968, ..., 285, 205 (27,045 in all). The Simba criterion runs on layers 0-22 (26,840 tokens) at
    4 D N + 4 D = 4*1536*16 + 4*1536 = 104,448 FLOPs per token; logits at all 2048 positions."""
    from simba_cli.models.config import OFFICIAL
    from simba_cli.simba.flops_tables import flops

    count = flops(OFFICIAL["mamba-130m"], PruneConfig(), 2048)
    assert count.tokens_in[:3] == [2048, 1968, 1888] and count.tokens_in[-2:] == [285, 205]
    assert sum(count.criterion) == 26_840 * 104_448
    assert count.total == 27_045 * 7_707_648 + 26_840 * 104_448 + 2048 * 77_233_152  # 369,430,219,776
    assert flops(OFFICIAL["mamba-130m"], PruneConfig(), 2048, head="last").head == 77_233_152


@pytest.mark.parametrize("family", FAMILIES)
def test_measured_flops_equal_analytic(family):
    model = tiny_model_of(family, n_layer=5)
    cfg = PruneConfig(final_keep=0.2)
    with torch.no_grad():
        out = pruned_forward(model, torch.randint(0, 64, (1, 50)), cfg)
    expected = analytic(model.cfg, 50, cfg.keep_ratios(5), "simba")
    assert out.flops.tokens_in == expected.tokens_in == [50, 40, 30, 20, 10]
    assert out.flops.total == expected.total
    assert out.flops.criterion[-1] == 0 and all(c > 0 for c in out.flops.criterion[:-1])
    assert out.flops.keep_ratios == [1.0, 0.8, 0.6, 0.4, 0.2]
    assert math.isclose(expected.total / analytic(model.cfg, 50).total, 0.6, rel_tol=0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_truncate_is_the_dense_model_on_the_last_tokens(family):
    """The equal-FLOPs baseline: every layer, the first included, reads only the last ceil(r L) tokens
    (protected ones always); in exit mode the tokens never read exit with their embedding."""
    model = tiny_model_of(family, 5, n_layer=4)
    ids, lengths = torch.randint(0, 64, (2, 40)), torch.tensor([40, 30])
    protected = torch.zeros(2, 40, dtype=torch.bool)
    protected[0, 35:40], protected[1, 25:30] = True, True
    config = PruneConfig("truncate", 0.5, mode="protect")
    out = pruned_forward(model, ids, config, lengths, protected=protected)
    for i, (length, kept) in enumerate([(40, 20), (30, 15)]):
        dense_tail = model(ids[i:i + 1, length - kept:length])[0, -5:]
        torch.testing.assert_close(out.logits[i][out.valid[i]], dense_tail, rtol=1e-4, atol=1e-5)
    assert out.flops.tokens_in == [35] * 4 and sum(out.flops.criterion) == 0
    assert config.label() == "truncate 0.5" and config.keep_ratios(4) == [0.5] * 4
    exits = pruned_forward(model, ids[:1], PruneConfig("truncate", 0.5))
    torch.testing.assert_close(exits.logits[0, :20], model.logits_from_stream(model.embed(ids[:1, :20]))[0])


@torch.no_grad()
def test_baseline_criteria_by_their_definitions_on_a_mamba1_layer():
    """dt-norm, output-norm, uniform, recent and random on a Mamba-1 layer, right-padded (Mamba-2: test_mamba2_run)."""
    from simba_cli.simba.criteria import LayerView, score
    from tests.test_mamba2_run import check_baseline_scores

    model = random_model(tiny_config(d_model=16, n_layer=2), seed=5)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([21, 9, 14])
    out, _ = model.layers[0](model.embed(ids), None, lengths, keep_scan_inputs=True)
    view = LayerView(out.scan, out.out, lengths, torch.tensor([5, 3, 4]), 0)
    real = torch.arange(21)[None, :] < lengths[:, None]
    torch.testing.assert_close(score("dt-norm", view)[real], out.scan.dt.norm(dim=-1)[real])
    assert torch.isneginf(score("dt-norm", view)[~real]).all()
    check_baseline_scores(view)
