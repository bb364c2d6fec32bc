"""Mamba-2 from a recipe: its initialisation, a few-step finetune (from scratch, continued, pruned), exact resume,
one-line errors for bad model keys, the zoo-m2 recipe, and the family in `simba zoo`."""

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from simba_cli.cli import app
from simba_cli.errors import Interrupted
from simba_cli.models.checkpoint import load_checkpoint, save_checkpoint
from simba_cli.models.mamba2 import Mamba2Config, Mamba2LM
from simba_cli.train import loop
from simba_cli.train.recipe import load_recipe, recipe_from_dict
from tests.test_defects import ROOT
from tests.test_train import data_file, losses  # noqa: F401  (data_file is a fixture)

TINY_M2 = {"family": "mamba2", "d_model": 16, "n_layer": 2, "d_state": 4, "head_dim": 8, "chunk_size": 8}


def tiny_m2_recipe(data, model=None, **train):
    """A tiny Mamba-2: 4 heads of 8 channels, one group, N = 4; chunks of 8, so that a window of 32 crosses chunks."""
    return recipe_from_dict({
        "name": "tiny-m2", "model": {**TINY_M2, **(model or {})},
        "tokenizer": {"vocab_size": 300}, "data": {"source": str(data), "seq_len": 32, "val_tokens": 512},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 20, "batch_size": 4, "eval_every": 1000, "checkpoint_every": 10, "log_every": 1, **train},
    })


def test_reset_parameters_is_mamba_ssms_init_and_is_seeded():
    cfg = Mamba2Config(d_model=64, n_layer=4, vocab_size=512, d_state=16, head_dim=16, n_groups=2,
                       tie_embeddings=True)
    model = Mamba2LM(cfg)
    model.reset_parameters(seed=3, dt_min=1e-3, dt_max=0.1)
    for block in model.layers:
        m = block.mixer
        dt = torch.nn.functional.softplus(m.dt_bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
        assert m.A_log.exp().min() >= 1 and m.A_log.exp().max() <= 16
        assert torch.equal(m.D, torch.ones(cfg.n_heads))
        assert torch.equal(m.norm.weight, torch.ones(cfg.d_inner))
        # kaiming-uniform bound 1/sqrt(fan_in), out_proj then scaled by 1/sqrt(n_layer)
        assert m.in_proj.weight.abs().max() <= 1 / math.sqrt(cfg.d_model)
        assert m.out_proj.weight.abs().max() <= 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer)
        assert m.out_proj.weight.abs().max() > 0.8 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer)
    assert model.backbone.embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.weight is model.backbone.embedding.weight
    again = Mamba2LM(cfg)
    again.reset_parameters(seed=3)
    other = Mamba2LM(cfg)
    other.reset_parameters(seed=4)
    a, b, c = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["backbone.layers.0.mixer.A_log"], c["backbone.layers.0.mixer.A_log"])


def test_mamba2_from_a_recipe_learns_and_reloads(data_file, tmp_path):  # noqa: F811
    metrics = loop.finetune(tiny_m2_recipe(data_file, steps=30), tmp_path / "run", progress=False)
    ls = losses(tmp_path / "run")
    assert len(ls) == 30 and sum(ls[-5:]) / 5 < 0.8 * sum(ls[:3]) / 3
    model = load_checkpoint(tmp_path / "run" / "model")
    assert isinstance(model, Mamba2LM)
    cfg = model.cfg
    assert (cfg.d_model, cfg.n_layer, cfg.d_state, cfg.head_dim, cfg.n_groups, cfg.chunk_size) == (16, 2, 4, 8, 1, 8)
    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, trained[k], msg=k)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["model_config"]["head_dim"] == 8
    assert metrics["flops_per_token"] > 0 and math.isfinite(metrics["val_ppl"])
    saved = load_recipe(tmp_path / "run" / "recipe.yaml")
    assert saved.model.family == "mamba2" and saved.to_dict() == tiny_m2_recipe(data_file, steps=30).to_dict()


def test_mamba2_resumes_exactly(data_file, tmp_path, monkeypatch):  # noqa: F811
    """As Mamba-1's (test_train): dropout on, interrupted at step 13, resumed from step 10's checkpoint."""
    loop.finetune(tiny_m2_recipe(data_file, dropout=0.1), tmp_path / "whole", progress=False)
    real_lr_at = loop.lr_at

    def interrupt_after_13(step, recipe):
        if step == 13:
            raise KeyboardInterrupt
        return real_lr_at(step, recipe)

    monkeypatch.setattr(loop, "lr_at", interrupt_after_13)
    with pytest.raises(Interrupted, match="the last checkpoint is step 10"):
        loop.finetune(tiny_m2_recipe(data_file, dropout=0.1), tmp_path / "split", progress=False)
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    loop.finetune(tiny_m2_recipe(data_file, dropout=0.1), tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "whole" / "model").state_dict()
    b = load_checkpoint(tmp_path / "split" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


def test_mamba2_trains_pruned_from_scratch_and_continues_from_saved_models(data_file, tmp_path):  # noqa: F811
    from simba_cli.simba.artifact import load_any

    # from scratch with Simba active (a prune section)
    raw = yaml.safe_load(tiny_m2_recipe(data_file, steps=3).to_yaml())
    raw["prune"] = {"final_keep": 0.5, "mode": "exit"}
    metrics = loop.finetune(recipe_from_dict(raw), tmp_path / "pruned", progress=False)
    assert metrics["pruned"] and metrics["pruned_flops_per_token"] < metrics["flops_per_token"]
    loaded, config = load_any(str(tmp_path / "pruned" / "model"))
    assert isinstance(loaded.model, Mamba2LM) and config is not None and config.final_keep == 0.5

    # continued: a saved dense Mamba-2, then the pruned artifact `simba prune` makes of it, through the CLI
    cont = tmp_path / "cont.yaml"
    cont.write_text(yaml.safe_dump({**yaml.safe_load(tiny_m2_recipe(data_file, steps=3).to_yaml()), "model": None}))
    base = tmp_path / "base"
    loop.finetune(tiny_m2_recipe(data_file, steps=3), base, progress=False)
    r = CliRunner().invoke(app, ["finetune", str(base / "model"), "--recipe", str(cont), "--out", str(tmp_path / "d"),
                                 "--quiet"])
    assert r.exit_code == 0 and "held-out perplexity" in r.output, r.output
    before, after = load_checkpoint(base / "model"), load_checkpoint(tmp_path / "d" / "model")
    assert isinstance(after, Mamba2LM) and after.cfg == before.cfg
    assert not torch.equal(before.state_dict()["backbone.layers.0.mixer.A_log"],
                           after.state_dict()["backbone.layers.0.mixer.A_log"])  # it trained on
    r = CliRunner().invoke(app, ["prune", str(base / "model"), "--final-keep", "0.5", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["finetune", str(tmp_path / "p"), "--recipe", str(cont), "--out",
                                 str(tmp_path / "ft"), "--quiet"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["pruned"] and metrics["keep_ratios"][-1] == pytest.approx(0.5, abs=0.04)
    loaded, config = load_any(str(tmp_path / "ft" / "model"))
    assert isinstance(loaded.model, Mamba2LM) and config.final_keep == 0.5


@pytest.mark.parametrize("model, words", [
    ({"family": "mamba3"}, ["model", "family", "mamba3"]),
    ({"family": "mamba"}, ["model", "head_dim", "Mamba-2 key"]),  # TINY_M2's head_dim in a Mamba-1 spec
    ({"heads": 4}, ["unknown key", "heads"]),
    ({"head_dim": 12}, ["model", "head_dim 12", "32"]),
    ({"n_groups": 3}, ["model", "n_groups 3", "4 heads"]),
    ({"chunk_size": 0}, ["model", "chunk_size"]),
    ({"d_state": "big"}, ["model.d_state"]),
    ({"n_groups": True}, ["model.n_groups"]),
])
def test_bad_model_keys_are_one_line_errors(data_file, tmp_path, model, words):  # noqa: F811
    raw = yaml.safe_load(tiny_m2_recipe(data_file).to_yaml())
    raw["model"] = {**raw["model"], **model}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["finetune", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    for w in words:
        assert w in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_a_mamba1_recipe_reads_and_writes_as_before():
    """No family key means mamba, and a Mamba-1 recipe carries no Mamba-2 keys, so older runs still resume."""
    r = load_recipe(ROOT / "recipes" / "zoo-m.yaml")
    assert r.model.family == "mamba" and r.model.d_state == 16
    assert set(r.to_dict()["model"]) == {"family", "d_model", "n_layer", "d_state", "expand", "d_conv"}
    old = {**r.to_dict(), "model": {k: v for k, v in r.to_dict()["model"].items() if k != "family"}}
    assert recipe_from_dict(old).to_dict() == r.to_dict()
    m2 = recipe_from_dict({**r.to_dict(), "model": {"family": "mamba2", "d_model": 64, "n_layer": 2}}).model
    assert (m2.d_state, m2.head_dim, m2.n_groups, m2.chunk_size) == (128, 64, 1, 256)  # Mamba2Config's defaults


def test_zoo_m2_recipe_is_zoo_ms_twin_in_flops_data_and_steps():
    from simba_cli.models.config import MambaConfig
    from simba_cli.simba.flops import dense_flops_per_token

    m1, m2 = (load_recipe(ROOT / "recipes" / f"{n}.yaml") for n in ("zoo-m", "zoo-m2"))
    s = m2.model
    assert s.family == "mamba2" and s.head_dim in (16, 32) and s.d_state in (16, 32) and s.n_groups == 1
    f1 = dense_flops_per_token(MambaConfig(d_model=m1.model.d_model, n_layer=m1.model.n_layer, vocab_size=2048,
                                           d_state=m1.model.d_state, expand=m1.model.expand, d_conv=m1.model.d_conv))
    f2 = dense_flops_per_token(loop.new_model(s, 2048).cfg)
    assert f2 / f1 == pytest.approx(1.0, abs=0.05)
    a, b = m1.to_dict(), m2.to_dict()
    assert a["data"] == b["data"] and a["train"] == b["train"] and a["optim"] == b["optim"]
    makefile = ROOT.joinpath("Makefile").read_text()
    assert "zoo-m2" not in makefile.split("ZOO := ")[1].splitlines()[0]
    assert "\nzoo-m2:" in makefile and "recipes/zoo-m2.yaml" in makefile


def test_simba_zoo_shows_each_models_family(tmp_path, monkeypatch):
    from simba_cli.models import zoo
    from tests.conftest import random_mamba2, random_model

    for name, model, flops in (("one", random_model(), 1e6), ("two", random_mamba2(), 2e6)):
        save_checkpoint(model, tmp_path / name)
        (tmp_path / name / "metrics.json").write_text(json.dumps({"flops_per_token": flops, "parameters": 10}))
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    assert zoo.names() == ["one", "two"] and zoo.names("mamba2") == ["two"] and zoo.names("mamba") == ["one"]
    r = CliRunner().invoke(app, ["zoo", "--json"])
    assert r.exit_code == 0, r.output
    assert [(row["name"], row["family"]) for row in json.loads(r.output)] == [("one", "mamba"), ("two", "mamba2")]
    r = CliRunner().invoke(app, ["zoo"])
    assert r.exit_code == 0 and "family" in r.output and "mamba2" in r.output, r.output
