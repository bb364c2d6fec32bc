"""The commands: prune artifacts, FLOPs tables and matching, one-line errors with exit code 2."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from simba_cli.cli import app
from simba_cli.models.checkpoint import save_checkpoint
from simba_cli.simba.flops import analytic
from simba_cli.simba.flops_tables import match_final_keep, model_config
from simba_cli.simba.settings import PruneConfig
from tests.conftest import random_model, tiny_config


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def model_dir(tmp_path):
    return save_checkpoint(random_model(tiny_config(n_layer=4)), tmp_path / "m", fmt="mamba_ssm")


def one_line_error(r, *words):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for w in words:
        assert w in lines[0]


def body_prune(artifact) -> dict:
    return yaml.safe_load((artifact / "simba.yaml").read_text())["prune"]


def test_prune_writes_a_loadable_self_describing_artifact(model_dir, tmp_path):
    out = tmp_path / "pruned"
    r = run("prune", model_dir, "--final-keep", "0.25", "--criterion", "simba-abs", "--out", out, "--seq-len", 64)
    assert r.exit_code == 0, r.output
    body = yaml.safe_load((out / "simba.yaml").read_text())
    assert body["base"] == str(model_dir.resolve())
    assert body["prune"]["final_keep"] == 0.25 and body["prune"]["criterion"] == "simba-abs"
    assert body["keep_ratios"][0] == 1 and body["keep_ratios"][-1] == 0.25 and len(body["keep_ratios"]) == 4
    want = analytic(model_config(str(model_dir))[0], 64, PruneConfig(final_keep=0.25).keep_ratios(4), "simba-abs")
    assert body["flops"]["pruned"] == want.total
    assert body["provenance"]["versions"]["torch"]
    from simba_cli.simba.artifact import load_any

    loaded, config = load_any(str(out), with_tokenizer=False)
    assert config.final_keep == 0.25 and loaded.model.cfg.n_layer == 4
    # flops-report on the artifact: its own settings, with the options given on top (as eval), and records them
    assert run("flops-report", out, "--out", tmp_path / "report").exit_code == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["settings"]["prune"][str(out)]["final_keep"] == 0.25
    assert report["settings"]["prune"][str(out)]["criterion"] == "simba-abs"
    assert run("flops-report", out, "--final-keep", "0.5", "--out", tmp_path / "report", "--overwrite").exit_code == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["settings"]["prune"][str(out)] == {**body_prune(out), "final_keep": 0.5}
    # flops-match matches an artifact with its own schedule
    step = tmp_path / "step"
    assert run("prune", model_dir, "--schedule", "step", "--stages", 2, "--out", step).exit_code == 0
    matched = json.loads(run("flops-match", step, "--target", model_dir, "--json").output)
    assert matched["config"]["schedule"] == "step" and matched["config"]["stages"] == 2
    # never overwritten without being asked
    one_line_error(run("prune", model_dir, "--out", out), "--overwrite")
    assert run("prune", model_dir, "--out", out, "--overwrite", "--final-keep", 0.5).exit_code == 0
    # protect mode: logits at the last position only, as flops-report --head last
    assert run("prune", model_dir, "--out", out, "--overwrite", "--mode", "protect", "--seq-len", 64).exit_code == 0
    body = yaml.safe_load((out / "simba.yaml").read_text())
    want = analytic(model_config(str(model_dir))[0], 64, PruneConfig().keep_ratios(4), "simba", head_positions=1)
    assert body["flops"]["pruned"] == want.total and body["flops"]["logits_at"] == "last"


def test_an_artifacts_fingerprint_follows_its_base_model(model_dir, tmp_path):
    """compare reuses finished parts by fingerprint: an artifact whose base was retrained must not match."""
    import shutil

    from simba_cli.provenance import model_fingerprint

    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    assert run("prune", base, "--out", tmp_path / "art").exit_code == 0
    before = model_fingerprint(str(tmp_path / "art"))
    weights = next(base.glob("*.bin"))  # mamba_ssm format: pytorch_model.bin
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert model_fingerprint(str(tmp_path / "art")) != before


@pytest.mark.parametrize("args, words", [
    (["--final-keep", "0"], ["final_keep", "(0, 1]"]),
    (["--final-keep", "1.5"], ["final_keep"]),
    (["--schedule", "zigzag"], ["zigzag", "linear"]),
    (["--criterion", "oracle"], ["oracle", "simba"]),
    (["--criterion", "simba-window:8:median"], ["median", "mean or max"]),
    (["--criterion", "simba-split:1.5"], ["recent share", "[0, 1]"]),
    (["--first-layer", "0"], ["first_layer"]),
    (["--seq-len", "1"], ["too short", "at least 2"]),
    (["--seq-len", "0"], ["too short"]),
])
def test_prune_rejects_bad_settings(model_dir, tmp_path, args, words):
    one_line_error(run("prune", model_dir, "--out", tmp_path / "x", *args), *words)
    assert not (tmp_path / "x" / "simba.yaml").exists()


@pytest.mark.parametrize("criterion", ["simba-window", "simba-window:16:max", "simba-split:0.25", "simba-channels"])
def test_prune_and_load_with_the_criteria_beyond_the_paper(criterion, tmp_path):
    """`simba prune zoo-s --criterion <each new name>` writes an artifact that loads and runs with it."""
    import torch

    from simba_cli.simba.artifact import load_any
    from simba_cli.simba.pruned import pruned_forward

    out = tmp_path / "p"
    r = run("prune", "zoo-s", "--criterion", criterion, "--out", out, "--seq-len", 256)
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((out / "simba.yaml").read_text())["prune"]["criterion"] == criterion
    loaded, config = load_any(str(out), with_tokenizer=False)
    assert config.criterion == criterion
    with torch.no_grad():
        res = pruned_forward(loaded.model, torch.randint(0, 2000, (2, 256)), config, torch.tensor([256, 200]))
    assert res.tokens_per_layer[-1].tolist() == [26, 20]


def test_missing_model_is_a_one_line_error(tmp_path):
    one_line_error(run("prune", tmp_path / "nope", "--out", tmp_path / "x"), "nope")
    one_line_error(run("flops-report", "not-a-model"), "not-a-model")


def test_flops_report_official_sizes_as_json():
    r = run("flops-report", "mamba-130m", "state-spaces/mamba-2.8b", "--seq-len", 2048, "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    dense130 = next(x for x in rows if x["model"] == "mamba-130m" and x["setting"] == "dense")
    # by hand (tests/test_simba.py): 24 layers x 7,707,648 + LM head 77,233,152 FLOPs per token
    assert dense130["FLOPs/token"] == 24 * 7_707_648 + 77_233_152
    pruned = next(x for x in rows if x["model"] == "state-spaces/mamba-2.8b" and x["setting"] != "dense")
    assert 0.5 < pruned["vs_dense"] < 0.6 and abs(pruned["mean_keep"] - 0.55) < 0.01


def test_flops_report_per_layer_and_files(tmp_path):
    r = run("flops-report", "mamba-130m", "--per-layer", "--format", "csv", "--seq-len", 100, "--out", tmp_path)
    assert r.exit_code == 0
    layers = json.loads((tmp_path / "layers.json").read_text())
    assert [x["tokens_in"] for x in layers][:2] == [100, 97] and layers[-1]["tokens_in"] == 10
    assert (tmp_path / "flops.md").is_file() and (tmp_path / "flops.csv").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["seq_len"] == 100 and report["provenance"]["versions"]["torch"]
    assert report["layers"] == layers
    assert report["settings"]["prune"]["mamba-130m"]["final_keep"] == 0.1
    one_line_error(run("flops-report", "mamba-130m", "--out", tmp_path), "--overwrite")
    assert run("flops-report", "mamba-130m", "--out", tmp_path, "--overwrite").exit_code == 0
    # --format json prints one document, per-layer rows included
    doc = json.loads(run("flops-report", "mamba-130m", "--per-layer", "--format", "json", "--seq-len", 100).output)
    assert [x["model"] for x in doc["models"]] == ["mamba-130m"] * 2 and doc["layers"] == layers
    for bad in (0, -5):
        one_line_error(run("flops-report", "mamba-130m", "--seq-len", bad), "--seq-len")


def test_flops_match_finds_the_largest_final_keep_within_the_target():
    m = match_final_keep("mamba-370m", "mamba-130m", 2048, PruneConfig(schedule="constant"), head="last")
    assert m.reachable and 0 < m.final_keep < 1
    at = lambda k: analytic(model_config("mamba-370m")[0], 2048,
                            PruneConfig(schedule="constant", final_keep=k).keep_ratios(48), head_positions=1).total
    assert at(m.final_keep) <= m.target_flops < at(m.final_keep + 2e-3)
    r = run("flops-match", "mamba-370m", "--target", "mamba-130m", "--head", "last", "--schedule", "constant")
    assert r.exit_code == 0 and "final_keep = " in r.output


def test_flops_match_says_when_no_value_can():
    r = run("flops-match", "mamba-370m", "--target", "mamba-130m", "--seq-len", 2048)
    assert r.exit_code == 1
    assert "no final_keep can match" in r.output and "1.65x" in r.output
    # the hint it gives is true: with a constant schedule some final_keep matches
    assert "it can with --schedule constant" in r.output and "--head last" not in r.output
    assert run("flops-match", "mamba-370m", "--target", "mamba-130m", "--schedule", "constant").exit_code == 0
    far = run("flops-match", "mamba-2.8b", "--target", "mamba-130m")
    assert far.exit_code == 1 and "11.17x" in far.output and "no schedule can" in far.output
