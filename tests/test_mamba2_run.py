"""Mamba-2 through the paths Mamba-1 takes: the mixer's interface, decoding against transformers, the pruned
forward, FLOPs by hand, both checkpoint formats, and the commands on a local Mamba-2 directory."""

import dataclasses
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from simba_cli.cli import app
from simba_cli.errors import UserError
from simba_cli.models.checkpoint import load_checkpoint, read_config, save_checkpoint
from simba_cli.models.decode import generate, prefill, step
from simba_cli.models.loading import load_model
from simba_cli.models.mamba2 import Mamba2Config, Mamba2LM, SSDScanInputs, ssd_scan_ref
from simba_cli.simba.criteria import LayerView, score
from simba_cli.simba.criteria_ssd import ssd_score
from simba_cli.simba.flops import analytic
from simba_cli.simba.pruned import pruned_forward
from simba_cli.simba.settings import PruneConfig
from tests.conftest import random_mamba2, tiny_mamba2_config
from tests.test_mamba2 import hf_mamba2_oracle

LENGTHS = torch.tensor([21, 9, 16])
IDS = torch.randint(0, 64, (3, 21), generator=torch.Generator().manual_seed(3))


# --- the mixer -------------------------------------------------------------------------------------

@torch.no_grad()
def test_mix_reports_scan_inputs_and_the_state_after_each_last_real_token():
    """Scan inputs leave the output unchanged and carry a dt that is zero on padding; the final states of a
    right-padded batch are each sequence's own, unpadded: the recurrence's state and its last d_conv inputs."""
    cfg = tiny_mamba2_config()
    mixer = random_mamba2(cfg).layers[1].mixer
    hidden = torch.randn(3, 21, cfg.d_model, generator=torch.Generator().manual_seed(0))
    hidden[1, 9:] = 1e3  # loud padding: nothing of it may reach a state or a score
    out = mixer.mix(hidden, LENGTHS, keep_scan_inputs=True, final_state=True)
    assert torch.equal(out.out, mixer.mix(hidden, LENGTHS).out)
    scan = out.scan
    assert isinstance(scan, SSDScanInputs)
    assert scan.x.shape == (3, 21, 8, 8) and scan.dt.shape == (3, 21, 8) and scan.A.shape == (8,)
    assert scan.B.shape == scan.C.shape == (3, 21, 2, 8) and scan.z.shape == (3, 21, 64)
    assert (scan.dt[1, 9:] == 0).all() and (scan.dt[2, 16:] == 0).all() and (scan.dt[0] > 0).all()
    assert out.conv_state.shape == (3, cfg.conv_dim, cfg.d_conv) and out.ssm_state.shape == (3, 8, 8, 8)
    for b, n in enumerate(LENGTHS.tolist()):
        alone = mixer.mix(hidden[b:b + 1, :n], final_state=True, keep_scan_inputs=True)
        torch.testing.assert_close(out.out[b, :n], alone.out[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.conv_state[b], alone.conv_state[0])
        torch.testing.assert_close(out.ssm_state[b], alone.ssm_state[0], rtol=1e-5, atol=1e-5)
        s = alone.scan
        _, state = ssd_scan_ref(s.x, s.dt, s.A, s.B, s.C, return_final_state=True)
        torch.testing.assert_close(out.ssm_state[b], state[0], rtol=1e-5, atol=1e-5)
        # the conv state is the last d_conv inputs of the conv (xBC before it), as transformers keeps it
        xbc = mixer.split_projection(hidden[b, :n])[1]
        torch.testing.assert_close(out.conv_state[b], xbc[-cfg.d_conv:].t())


@torch.no_grad()
def test_criteria_read_a_mamba2_layer():
    """simba* is the SSD formula on the layer's scan inputs, dt-norm the norm of dt over heads; the others
    need no scan."""
    model = random_mamba2()
    out, _ = model.layers[0](model.embed(IDS), None, LENGTHS, keep_scan_inputs=True)
    view = LayerView(out.scan, out.out, LENGTHS, torch.tensor([5, 3, 4]), 0)
    s = out.scan
    padding = torch.arange(21)[None, :] >= LENGTHS[:, None]
    for variant in ("simba", "simba-abs", "simba-gated"):
        z_T = s.z[torch.arange(3), LENGTHS - 1]
        want = ssd_score(s.x, s.dt, s.A, s.B, s.C, LENGTHS, variant, z_T if variant == "simba-gated" else None)
        assert torch.equal(score(variant, view), want.float())
    dt_norm = score("dt-norm", view)
    torch.testing.assert_close(dt_norm[~padding], s.dt.norm(dim=-1)[~padding])
    assert torch.isneginf(dt_norm[padding]).all()
    for criterion in ("output-norm", "random", "uniform", "recent"):
        got = score(criterion, LayerView(None, out.out, LENGTHS, torch.tensor([5, 3, 4]), 0))
        assert torch.isneginf(got[padding]).all() and torch.isfinite(got[~padding]).all()
    check_baseline_scores(LayerView(None, out.out, LENGTHS, torch.tensor([5, 3, 4]), 0))


def check_baseline_scores(view):
    """The baselines' values by their definitions (criteria module docstring), on any family's layer output."""
    lengths, keep = view.lengths, view.keep
    b, l = view.output.shape[:2]
    real = torch.arange(l)[None, :] < lengths[:, None]
    by_hand = {"output-norm": view.output.clamp(min=0).sum(-1), "recent": torch.arange(l).float().expand(b, l)}
    for criterion, want in by_hand.items():
        got = score(criterion, view)
        torch.testing.assert_close(got[real], want.float()[real])
    protected = view.protected if view.protected is not None else torch.arange(l)[None, :] == lengths[:, None] - 1
    uniform = score("uniform", view)
    for i, (n, k) in enumerate(zip(lengths.tolist(), keep.tolist())):
        # beside the protected positions (which select keeps), k in all: evenly spaced over the rest, both ends
        free = [p for p in range(n) if not protected[i, p]]
        chosen = torch.nonzero(uniform[i] == 1).flatten().tolist()
        assert len(chosen) == k - int(protected[i, :n].sum()) >= 2 and set(chosen) <= set(free)
        assert chosen[0] == free[0] and chosen[-1] == free[-1]
        gaps = torch.diff(torch.tensor([free.index(p) for p in chosen]))
        assert int(gaps.max()) - int(gaps.min()) <= 1
    first, again = score("random", view), score("random", view)
    assert torch.equal(first, again) and ((first[real] >= 0) & (first[real] < 1)).all()
    other_layer = score("random", dataclasses.replace(view, layer=view.layer + 1))
    assert not torch.equal(first[real], other_layer[real])  # a fresh draw per layer


# --- decoding --------------------------------------------------------------------------------------

@torch.no_grad()
def test_recurrent_decoding_equals_the_full_forward(projections):
    """A right-padded prefill, then one token at a time: the logits of every step are the full forward's."""
    model = random_mamba2(tiny_mamba2_config(n_layer=3))
    full = model(IDS)
    start = torch.tensor([5, 9, 12])  # each sequence's prompt: its first `start` tokens, right-padded
    prompt = torch.where(torch.arange(21)[None, :] < start[:, None], IDS, 0)
    logits, state = prefill(model, prompt, start)
    torch.testing.assert_close(logits, full[torch.arange(3), start - 1], rtol=1e-4, atol=1e-4)
    for k in range(8):
        logits = step(model, IDS[torch.arange(3), start + k], state)
        torch.testing.assert_close(logits, full[torch.arange(3), start + k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_greedy_generation_of_right_padded_prompts_equals_transformers(tmp_path, n_groups, projections):
    """The oracle generates each prompt alone (it has no right padding); ours, the padded batch at once."""
    oracle, directory = hf_mamba2_oracle(tmp_path, n_groups=n_groups)
    ours = load_checkpoint(directory).eval()
    assert isinstance(ours, Mamba2LM)
    lengths = torch.tensor([19, 7, 12])
    ids = torch.randint(1, 64, (3, 19), generator=torch.Generator().manual_seed(n_groups))
    ids = torch.where(torch.arange(19)[None, :] < lengths[:, None], ids, 0)
    new = generate(ours, ids, 10, lengths)
    for b, n in enumerate(lengths.tolist()):
        prompt = ids[b:b + 1, :n]
        with torch.no_grad():
            want = oracle.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
        assert new[b].tolist() == want[0, n:].tolist()


# --- the pruned forward ----------------------------------------------------------------------------

@torch.no_grad()
def test_pruned_forward_keeping_every_token_is_the_dense_forward():
    model = random_mamba2(tiny_mamba2_config(n_layer=4))
    dense = model(IDS, LENGTHS)
    out = pruned_forward(model, IDS, PruneConfig(final_keep=1.0), LENGTHS, final_state=True)
    assert torch.equal(out.logits, dense) and out.valid.tolist() == (torch.arange(21) < LENGTHS[:, None]).tolist()
    protected = torch.zeros(3, 21, dtype=torch.bool)
    protected[0, 4:7] = True
    prot = pruned_forward(model, IDS, PruneConfig(final_keep=1.0, mode="protect"), LENGTHS, protected)
    for b in range(3):
        rows = prot.positions[b][prot.valid[b]]
        torch.testing.assert_close(prot.logits[b][prot.valid[b]], dense[b, rows], rtol=1e-6, atol=1e-6)
    assert prot.positions[0].tolist() == [4, 5, 6, 20] and prot.positions[1, 0] == 8
    # the states are the dense prefill's
    _, state = prefill(model, IDS, LENGTHS)
    for i in range(4):
        assert torch.equal(out.state.conv[i], state.conv[i]) and torch.equal(out.state.ssm[i], state.ssm[i])


@torch.no_grad()
def test_measured_flops_of_a_pruned_mamba2_by_hand():
    """d = 32, D = 64, H = 8, P = 8, G = 2, N = 8, k = 4, V = 64. Per token and layer: norm 4 d = 128; in_proj
    2 d (2 D + 2 G N + H) = 64 * 168 = 10,752; conv 2 (D + 2 G N) k = 768; scan 5 H P N + 3 H P + H = 2,560 + 192
    + 8 = 2,760; gated norm 4 D = 256; out_proj 2 D d = 4,096: 18,760. Simba: 2 G N + 4 H + 2 D = 192 per token
    scored. Head: 4 d + 2 d V = 4,224 per position."""
    model = random_mamba2(tiny_mamba2_config(n_layer=5))
    out = pruned_forward(model, torch.randint(0, 64, (1, 50)), PruneConfig(final_keep=0.2))
    assert out.flops.tokens_in == [50, 40, 30, 20, 10]
    assert out.flops.layer == [t * 18_760 for t in (50, 40, 30, 20, 10)]
    assert out.flops.criterion == [t * 192 for t in (50, 40, 30, 20)] + [0]
    assert out.flops.head == 50 * 4_224
    assert out.flops.total == 150 * 18_760 + 140 * 192 + 50 * 4_224 == 3_052_080
    assert out.flops.total == analytic(model.cfg, 50, PruneConfig(final_keep=0.2).keep_ratios(5)).total
    dt_norm = pruned_forward(model, torch.randint(0, 64, (1, 50)), PruneConfig(final_keep=0.2, criterion="dt-norm"))
    assert dt_norm.flops.criterion == [t * 2 * 8 for t in (50, 40, 30, 20)] + [0]  # 2 H per token


# --- checkpoints -----------------------------------------------------------------------------------

def state_spaces_dir(oracle, directory):
    """The oracle's weights as state-spaces/mamba2-* files: mamba-ssm's config.json and pytorch_model.bin."""
    cfg = oracle.config
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({
        "d_model": cfg.hidden_size, "d_intermediate": 0, "n_layer": cfg.num_hidden_layers, "vocab_size": 60,
        "ssm_cfg": {"layer": "Mamba2", "d_state": cfg.state_size, "headdim": cfg.head_dim, "ngroups": cfg.n_groups,
                    "chunk_size": cfg.chunk_size, "bias": cfg.use_bias},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 16, "tie_embeddings": False}))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in oracle.state_dict().items()}
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def test_both_checkpoint_formats_load_by_their_config(tmp_path):
    oracle, hf_dir = hf_mamba2_oracle(tmp_path, n_groups=2)
    ssm_dir = state_spaces_dir(oracle, tmp_path / "ssm")
    cfg, fmt = read_config(ssm_dir)
    assert fmt == "mamba_ssm" and isinstance(cfg, Mamba2Config) and cfg.vocab_size == 64  # 60 padded to 16
    assert (cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.chunk_size) == (4, 16, 2, 8)
    with torch.no_grad():
        want = oracle(IDS).logits
        for directory, kind in ((hf_dir, "hf"), (ssm_dir, "mamba_ssm")):
            loaded = load_model(str(directory), with_tokenizer=False)
            assert loaded.format == kind and isinstance(loaded.model, Mamba2LM)
            torch.testing.assert_close(loaded.model(IDS), want, rtol=1e-4, atol=1e-4)
        # saved again in either format, it loads as itself
        ours = load_checkpoint(ssm_dir).eval()
        for fmt in ("hf", "mamba_ssm"):
            again = save_checkpoint(ours, tmp_path / f"again-{fmt}", fmt=fmt)
            assert read_config(again) == (ours.cfg, fmt)
            assert torch.equal(load_checkpoint(again)(IDS), ours(IDS))


def test_mamba2_variants_that_do_not_fit_are_one_line_errors(tmp_path):
    oracle, _ = hf_mamba2_oracle(tmp_path)
    directory = state_spaces_dir(oracle, tmp_path / "ssm")
    config = json.loads((directory / "config.json").read_text())
    for change, words in ((dict(d_intermediate=128), "d_intermediate=128"),
                          (dict(attn_layer_idx=[1]), "attn_layer_idx"),
                          (dict(ssm_cfg={**config["ssm_cfg"], "D_has_hdim": True}), "D_has_hdim=True"),
                          (dict(ssm_cfg={**config["ssm_cfg"], "norm_before_gate": True}), "norm_before_gate")):
        (directory / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=f"not supported.*{words}"):
            load_checkpoint(directory)
    (directory / "config.json").write_text(json.dumps({**config, "ssm_cfg": {**config["ssm_cfg"], "d_state": 16}}))
    with pytest.raises(UserError, match="shape mismatch"):
        load_checkpoint(directory)


# --- the commands ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mamba2_dir(tmp_path_factory):
    """A tiny random Mamba-2 in mamba-ssm's format with its own tokenizer beside it."""
    from simba_cli.data.bpe import train_bpe
    from tests.test_eval import TEXT

    model = random_mamba2(tiny_mamba2_config(vocab_size=304, n_layer=4), seed=3)
    directory = tmp_path_factory.mktemp("m2") / "ssm"
    return save_checkpoint(model, directory, fmt="mamba_ssm", tokenizer=train_bpe(TEXT, 300))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_prune_eval_and_generate_a_local_mamba2(mamba2_dir, tmp_path):
    out = tmp_path / "pruned"
    r = run("prune", mamba2_dir, "--final-keep", "0.25", "--out", out, "--seq-len", 64)
    assert r.exit_code == 0, r.output
    body = yaml.safe_load((out / "simba.yaml").read_text())
    cfg = read_config(mamba2_dir)[0]
    assert body["model"]["head_dim"] == 8 and body["model"]["dt_limit"] == [0.0, float("inf")]
    assert body["flops"]["pruned"] == analytic(cfg, 64, PruneConfig(final_keep=0.25).keep_ratios(4)).total
    results = tmp_path / "eval"
    r = run("eval", out, "--tasks", "simba_choice", "--limit", 2, "--ppl-contexts", 48, "--ppl-score-last", 16,
            "--ppl-windows", 2, "--out", results)
    assert r.exit_code == 0, r.output
    res = json.loads((results / "results.json").read_text())
    assert res["prune"]["final_keep"] == 0.25 and res["tasks"]["simba_choice"]["docs"] == 2
    measured = res["tasks"]["simba_choice"]["measured"]
    assert len(measured["keep_ratios"]) == 4 and measured["keep_ratios"][-1] < 1
    assert res["perplexity"][0]["context"] == 48
    # the weights that ran: the artifact's and its base model's fingerprints, and the held-out text's tokens
    from simba_cli.provenance import model_fingerprint

    assert res["provenance"]["base_model"] == str(mamba2_dir)
    assert res["provenance"]["base_model_fingerprint"] == model_fingerprint(str(mamba2_dir))
    assert res["provenance"]["model_fingerprint"] == model_fingerprint(str(out))
    assert res["settings"]["ppl_stream"]["source"] == "shakespeare" and res["settings"]["ppl_stream"]["tokens"] > 48
    for args in ([], ["--final-keep", "0.5"]):
        r = run("generate", mamba2_dir, "--prompt", "To be, or not to be, that is", "--max-new-tokens", 4, *args)
        assert r.exit_code == 0 and r.stdout.strip() and "prefill" in r.stderr, r.output


def test_flops_report_and_match_know_mamba2(mamba2_dir):
    r = run("flops-report", "mamba2-130m", "state-spaces/mamba2-2.7b", "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    dense130 = next(x for x in rows if x["model"] == "mamba2-130m" and x["setting"] == "dense")
    assert dense130["FLOPs/token"] == 281_706_048  # by hand in tests/test_mamba2_simba.py
    assert {x["model"] for x in rows} == {"mamba2-130m", "state-spaces/mamba2-2.7b"} and len(rows) == 4
    local = json.loads(run("flops-report", mamba2_dir, "--format", "json", "--seq-len", 64).output)
    cfg = read_config(mamba2_dir)[0]
    assert local[0]["FLOPs/token"] == analytic(cfg, 64).total / 64 and local[0]["n_layer"] == 4
    m = run("flops-match", "mamba2-370m", "--target", "mamba2-130m", "--schedule", "constant", "--json")
    assert m.exit_code == 0, m.output
    match = json.loads(m.output)
    assert match["reachable"] and 0 < match["final_keep"] < 1 and match["flops"] <= match["target_flops"]
    # a local Mamba-2 as the target: an official size pruned never gets that cheap, and says so
    far = run("flops-match", "mamba2-130m", "--target", mamba2_dir)
    assert far.exit_code == 1 and "no final_keep can match" in far.output
