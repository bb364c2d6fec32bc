"""Training: loss falls, exact resume, data parallel = one process, recipe errors, the zoo's perplexities."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from simba_cli.cli import app
from simba_cli.errors import Interrupted, UserError
from simba_cli.models.checkpoint import load_checkpoint
from simba_cli.simba.settings import PruneConfig
from simba_cli.train import loop
from simba_cli.train.recipe import recipe_from_dict

WORDS = ("king queen lord crown sword night day love death blood heaven earth sea fire grief joy honour "
         "shame father mother son brother sister friend foe").split()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Synthetic verse-like text (a fixed pseudo-random word sequence)."""
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (8,), generator=g).tolist()) for _ in range(600)]
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(lines))
    return path


def tiny_recipe(data, **train):
    return recipe_from_dict({
        "name": "tiny", "model": {"d_model": 16, "n_layer": 2, "d_state": 4},
        "tokenizer": {"vocab_size": 300}, "data": {"source": str(data), "seq_len": 32, "val_tokens": 512},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 20, "batch_size": 4, "eval_every": 1000, "checkpoint_every": 10, "log_every": 1, **train},
    })


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "train_log.jsonl").read_text().splitlines() if '"loss"' in x]


def test_loss_falls(data_file, tmp_path):
    loop.finetune(tiny_recipe(data_file, steps=30), tmp_path / "run", progress=False)
    ls = losses(tmp_path / "run")
    assert sum(ls[-5:]) / 5 < 0.8 * sum(ls[:3]) / 3


def test_interrupted_run_keeps_its_checkpoint_and_resumes_exactly(data_file, tmp_path, monkeypatch):
    """With dropout on, so the RNG state is part of what resumes. Interrupted at step 13: the checkpoint of
    step 10 survives, and the log records of steps 11-13 are dropped and redone."""
    loop.finetune(tiny_recipe(data_file, dropout=0.1), tmp_path / "whole", progress=False)

    real_lr_at = loop.lr_at

    def interrupt_after_13(step, recipe):
        if step == 13:
            raise KeyboardInterrupt
        return real_lr_at(step, recipe)

    monkeypatch.setattr(loop, "lr_at", interrupt_after_13)
    with pytest.raises(Interrupted, match=r"interrupted at step 13; the last checkpoint is step 10: .*--resume"):
        loop.finetune(tiny_recipe(data_file, dropout=0.1), tmp_path / "split", progress=False)
    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 10  # the last complete checkpoint survived the interruption
    assert len(losses(tmp_path / "split")) == 13
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    loop.finetune(tiny_recipe(data_file, dropout=0.1), tmp_path / "split", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "whole" / "model").state_dict()
    b = load_checkpoint(tmp_path / "split" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    whole, split = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "split"))
    assert split["final_train_loss"] == pytest.approx(whole["final_train_loss"], rel=1e-5)
    run_record = json.loads((tmp_path / "split" / "run.json").read_text())
    assert len(run_record["resumes"]) == 1 and run_record["resumes"][0]["git_commit"] == run_record["git_commit"]
    # a finished run resumed is left as it is: its metrics returned, nothing trained, evaluated or recorded again
    finished = (tmp_path / "split" / "metrics.json").read_text()
    assert loop.finetune(tiny_recipe(data_file, dropout=0.1), tmp_path / "split", resume=True,
                         progress=False) == json.loads(finished)
    assert (tmp_path / "split" / "metrics.json").read_text() == finished
    assert len(json.loads((tmp_path / "split" / "run.json").read_text())["resumes"]) == 1
    # a resume from the final checkpoint (a kill during the export, before metrics.json) keeps the last loss
    (tmp_path / "split" / "metrics.json").unlink()
    loop.finetune(tiny_recipe(data_file, dropout=0.1), tmp_path / "split", resume=True, progress=False)
    again = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert again["final_train_loss"] == pytest.approx(whole["final_train_loss"], rel=1e-5)


def test_a_run_interrupted_before_its_first_checkpoint_can_be_resumed(data_file, tmp_path, monkeypatch):
    """Nothing to continue from: --resume starts it again, and the result is the uninterrupted run's."""
    loop.finetune(tiny_recipe(data_file), tmp_path / "whole", progress=False)
    real_lr_at = loop.lr_at

    def interrupt_at_3(step, recipe):
        if step == 3:
            raise KeyboardInterrupt
        return real_lr_at(step, recipe)

    monkeypatch.setattr(loop, "lr_at", interrupt_at_3)
    with pytest.raises(Interrupted, match="no checkpoint yet, so it starts again from step 0"):
        loop.finetune(tiny_recipe(data_file), tmp_path / "early", progress=False)
    monkeypatch.setattr(loop, "lr_at", real_lr_at)
    with pytest.raises(UserError, match="pass --resume to continue it or --overwrite"):
        loop.finetune(tiny_recipe(data_file), tmp_path / "early", progress=False)
    loop.finetune(tiny_recipe(data_file), tmp_path / "early", resume=True, progress=False)
    assert losses(tmp_path / "early") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


def test_dropout_acts_in_training_only_and_leaves_the_model_plain():
    from tests.conftest import random_model, tiny_config

    model = random_model(tiny_config(), 0)
    keys = set(model.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        dense = model.eval()(ids)
        handles = loop.add_dropout(model, 0.3)
        assert torch.equal(model.eval()(ids), dense)  # eval mode: no dropout
        model.train()
        assert not torch.allclose(model(ids), dense)
        assert not torch.allclose(model(ids), model(ids))
    assert set(model.state_dict()) == keys and len(handles) == 1 + len(model.layers)


@pytest.mark.parametrize("variant", ["dense", "pruned", "recall"])
def test_two_gloo_processes_equal_one(data_file, tmp_path, variant):
    recipe = tmp_path / "r.yaml"
    r = tiny_recipe(data_file, steps=6)
    if variant == "pruned":  # Simba in training: each process prunes its own sequences, the loss on every position
        r = recipe_from_dict({**yaml.safe_load(r.to_yaml()), "prune": {"final_keep": 0.5, "mode": "exit"}})
    if variant == "recall":  # the answers' mean and the other tokens' mean are over both processes' rows
        body = yaml.safe_load(r.to_yaml())
        body["data"].update(seq_len=128, recall={"share": 0.5, "passkey": 1.0, "mqar": 0.0, "shortest": 128,
                                                 "lead_len": 128, "answer_loss": 4.0})
        r = recipe_from_dict(body)
    recipe.write_text(r.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "simba_cli.cli", "finetune", "--recipe", str(recipe),
                          "--out", str(tmp_path / "one"), "--quiet"], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    # --standalone: a rendezvous on a free port, so two test suites on one machine never collide
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "simba_cli.cli", "finetune",
                          "--recipe", str(recipe), "--out", str(tmp_path / "two"), "--quiet"],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_checkpoint(tmp_path / "one" / "model").state_dict()
    b = load_checkpoint(tmp_path / "two" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_finetune_with_pruning_from_an_artifact(data_file, tmp_path):
    from simba_cli.simba.artifact import load_any

    base = tmp_path / "base"
    loop.finetune(tiny_recipe(data_file, steps=3), base, progress=False)
    r = CliRunner().invoke(app, ["prune", str(base / "model"), "--final-keep", "0.5", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    cont = tiny_recipe(data_file, steps=3)
    cont.model = None
    metrics = loop.finetune(cont, tmp_path / "ft", init_from=str(tmp_path / "p"), progress=False)
    assert metrics["pruned"] and math.isfinite(metrics["val_ppl"])
    assert metrics["keep_ratios"][-1] == pytest.approx(0.5, abs=0.04)  # 2 layers, linear to 0.5, 32 tokens
    assert metrics["pruned_flops_per_token"] < metrics["flops_per_token"]
    assert {"simba.yaml", "train_log.jsonl", "metrics.json"} <= {f.name for f in (tmp_path / "ft" / "model").iterdir()}
    loaded, config = load_any(str(tmp_path / "ft" / "model"))
    assert config is not None and config.final_keep == 0.5  # the fine-tuned model remembers its pruning
    assert yaml.safe_load((tmp_path / "ft" / "model" / "simba.yaml").read_text())["base"] == "."
    # resuming with the same recipe (no prune section: the artifact's pruning applies) is accepted
    again = tiny_recipe(data_file, steps=3)
    again.model = None
    assert loop.finetune(again, tmp_path / "ft", init_from=str(tmp_path / "p"), resume=True, progress=False)["pruned"]


def test_a_pruned_finetune_reports_the_keep_ratios_its_forward_measured(data_file, tmp_path):
    """protect mode with more protected positions than the schedule's last budget: the forward keeps every
    protected token, and metrics.json says so (not the schedule's ratio)."""
    recipe = tiny_recipe(data_file, steps=2)
    recipe.prune = PruneConfig("linear", 0.1, mode="protect")
    recipe.train.protect_last = 16
    metrics = loop.finetune(recipe, tmp_path / "p", progress=False)
    seq = recipe.data.seq_len
    assert recipe.prune.keep_ratios(2)[-1] * seq < 16  # the schedule alone would keep fewer
    assert metrics["keep_ratios"][-1] == pytest.approx(16 / seq)
    # val_loss averages the protected positions alone; the precision that ran on this CPU
    assert metrics["val_scored_tokens"] == metrics["val_tokens"] // seq * 16 and metrics["precision"] == "fp32"


@pytest.mark.parametrize("change, words", [
    ({"train": {"stepz": 3}}, ["unknown key", "stepz"]),
    ({"optim": {"lr": -1}}, ["optim.lr"]),
    ({"data": {"seq_len": "long"}}, ["data.seq_len"]),
    ({"prune": {"final_keep": 2}}, ["final_keep"]),
    ({"prune": {"criterion": "oracle"}}, [".prune", "oracle"]),
    ({"prune": {"schedule": "zigzag"}}, [".prune", "zigzag"]),
])
def test_bad_recipes_are_one_line_errors(data_file, tmp_path, change, words):
    raw = yaml.safe_load(tiny_recipe(data_file).to_yaml())
    for section, values in change.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    r = CliRunner().invoke(app, ["finetune", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    for w in words:
        assert w in r.output


def test_missing_and_empty_data_are_one_line_errors(data_file, tmp_path):
    """... and they leave an earlier run in --out alone, even with --overwrite."""
    (tmp_path / "r.yaml").write_text(tiny_recipe(data_file).to_yaml())
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": "unterminated\n')
    (tmp_path / "tiny.txt").write_text("one line only\n")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "run.json").write_text("{}")
    (tmp_path / "o" / "recipe.yaml").write_text(tiny_recipe(data_file).to_yaml())
    for data, words in [(tmp_path / "nope.txt", ["does not exist"]), (tmp_path / "empty", ["no text"]),
                        (tmp_path / "empty.jsonl", ["empty"]), (tmp_path / "broken.jsonl", ["cannot read"]),
                        (tmp_path / "tiny.txt", ["too small"])]:
        r = CliRunner().invoke(app, ["finetune", "--recipe", str(tmp_path / "r.yaml"), "--data", str(data),
                                     "--out", str(tmp_path / "o"), "--overwrite"])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert all(w in r.output for w in words), r.output
        assert (tmp_path / "o" / "run.json").is_file()


def test_overwrite_replaces_only_a_run(data_file, tmp_path):
    (tmp_path / "r.yaml").write_text(tiny_recipe(data_file, steps=2).to_yaml())
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's own file")
    r = CliRunner().invoke(app, ["finetune", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "mine"),
                                 "--overwrite"])
    assert r.exit_code == 2 and "no `simba finetune` wrote" in r.output, r.output
    assert (tmp_path / "mine" / "notes.txt").is_file()


def test_a_recipe_that_is_not_a_mapping_is_a_one_line_error(tmp_path):
    (tmp_path / "r.yaml").write_text("- just\n- a list\n")
    r = CliRunner().invoke(app, ["finetune", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "mapping" in r.output, r.output


def test_data_without_splits_is_split_deterministically_and_held_out(tmp_path):
    from simba_cli.data.corpus import SPLITS, load_texts

    # one file: cut at line boundaries into 90% train, then 5% validation, then 5% evaluation
    text = "".join(f"line {i} of the only document\n" for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    parts = {s: load_texts(str(tmp_path / "one.txt"), s) for s in SPLITS}
    assert parts["train"][0] + parts["validation"][0] + parts["evaluation"][0] == text
    assert all(p[0].endswith("\n") for p in parts.values())  # whole lines
    assert 0.04 < len(parts["validation"][0]) / len(text) < 0.06
    # many documents: whole documents, 5% each held out, the same ones every time
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:02d}.txt").write_text(f"document {i}\n" * 5)
    parts = {s: load_texts(str(folder), s) for s in SPLITS}
    assert [len(parts[s]) for s in SPLITS] == [36, 2, 2]
    assert sorted(sum(parts.values(), [])) == sorted((folder / f"{i:02d}.txt").read_text() for i in range(40))
    assert load_texts(str(folder), "validation") == parts["validation"]
    # records: one JSON object per line, the recipe's text field
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"body": f"record {i}", "id": i}) + "\n" for i in range(20)))
    assert len(load_texts(str(records), "train", "body")) == 18 and load_texts(str(records), "evaluation", "body")
    # a document copied many times (web data): every copy on one side, whichever split it lands in
    import hashlib

    from simba_cli.data.corpus import held_out

    rank = lambda t: hashlib.sha256(t.encode()).hexdigest()  # noqa: E731  (the order held_out ranks texts by)
    docs = [f"doc {i}" for i in range(40)]
    first = min(map(rank, docs))
    copied = next(t for t in (f"copied text {j}" for j in range(10000)) if rank(t) < first)  # ranked first:
    docs += [copied] * 10  # its copies would fill validation, evaluation and train if ranked one by one
    parts = {s: held_out(docs, s) for s in SPLITS}
    for a_split in SPLITS:
        for b_split in SPLITS:
            if a_split != b_split:
                assert not set(parts[a_split]) & set(parts[b_split]), (a_split, b_split)
    assert sorted(sum(parts.values(), [])) == sorted(docs)


def test_the_zoo_is_a_ladder_of_at_most_1_5x_steps():
    from simba_cli.models import zoo

    rows = [zoo.info(n) for n in zoo.names("mamba")]  # the Mamba-1 ladder (a Mamba-2 rung sits beside its twin)
    assert len(rows) >= 5
    for small, big in zip(rows, rows[1:]):
        assert 1.1 < big["flops_per_token"] / small["flops_per_token"] <= 1.5


@pytest.mark.parametrize("name", __import__("simba_cli.models.zoo", fromlist=["names"]).names())
def test_zoo_model_reproduces_its_recorded_perplexity(name):
    """Loaded by name, each zoo model scores the held-out windows it was measured on, to the recorded value."""
    from simba_cli.data.corpus import load_texts
    from simba_cli.data.tokens import eval_windows, tokenize_documents
    from simba_cli.models import zoo
    from simba_cli.models.loading import load_model

    metrics = zoo.info(name)
    loaded = load_model(name)
    stream = tokenize_documents(loaded.tokenizer, load_texts("shakespeare", "validation"))
    windows = eval_windows(stream, metrics["val_seq_len"], metrics["val_tokens"])
    recipe = tiny_recipe("unused")
    recipe.prune = None
    val = loop.evaluate_loss(loaded.model, windows, loop.LossFn(recipe), 8, "cpu")
    assert math.exp(val) == pytest.approx(metrics["val_ppl"], rel=1e-5)  # measured on the published (bf16) weights


def test_zoo_card_measured_again_in_place(tmp_path, monkeypatch):
    """`python -m simba_cli.eval.zoocard --card NAME` measures a published model's card again: the context gain is
    the paired mean over windows, log(ppl_ctx128 / ppl_ctx1024), with its standard error; weights stay as they are."""
    import shutil

    from simba_cli.eval import zoocard
    from simba_cli.models import zoo

    shutil.copytree(zoo.path("zoo-xxxs"), tmp_path / "zoo-xxxs")
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    monkeypatch.setattr(zoocard, "WINDOWS", 24)
    weights = (tmp_path / "zoo-xxxs" / "model.safetensors").read_bytes()
    before = json.loads((tmp_path / "zoo-xxxs" / "metrics.json").read_text())
    monkeypatch.setattr(sys, "argv", ["zoocard", "--card", "zoo-xxxs"])
    zoocard.main()
    card = zoo.info("zoo-xxxs")
    assert (tmp_path / "zoo-xxxs" / "model.safetensors").read_bytes() == weights
    assert card["ppl_windows"] == 24 and card["train_time_s"] == before["train_time_s"]
    # (each window's NLL is summed in float32, the perplexities in float64: they agree to about 1e-7)
    assert card["context_gain"] == pytest.approx(math.log(card["ppl_ctx128"] / card["ppl_ctx1024"]), abs=1e-6)
    assert 0 < card["context_gain_se"] < 0.05
    assert card["val_ppl"] == pytest.approx(before["val_ppl"], rel=1e-5)
    r = CliRunner().invoke(app, ["zoo"])
    assert r.exit_code == 0 and "context gain" in r.output and "%" in r.output, r.output


def test_zoo_card_says_what_is_wrong_in_one_line(tmp_path, capsys, monkeypatch):
    from simba_cli.eval import zoocard

    for argv, says in ((["--card", "zoo-nope"], "no zoo model named 'zoo-nope'"),
                       ([str(tmp_path)], "is not a finished training run")):
        monkeypatch.setattr(sys, "argv", ["zoocard", *argv])
        with pytest.raises(SystemExit) as exit_:
            zoocard.main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    """Each recipe the README or the Makefile names is valid as written: a training recipe (finetune) or a
    comparison (compare)."""
    from simba_cli.eval.compare import CompareSpec
    from simba_cli.train.recipe import load_recipe

    assert len(RECIPES) >= 15
    if "train" in yaml.safe_load(path.read_text()):
        assert load_recipe(path).train.steps > 0
    else:
        assert isinstance(CompareSpec.from_yaml(path), CompareSpec)


def test_recipe_checks_protected_positions_and_recall_pairs(data_file, tmp_path):
    """Protect mode's loss positions are never pruned: as many as a row holds would leave nothing to prune (a
    run recorded as pruned that pruned nothing); MQAR cannot ask more facts than there are keys."""
    from simba_cli.data.longrange import KEYS, RecallMix
    from simba_cli.errors import UserError

    recipe = tiny_recipe(data_file, steps=2, protect_last=32)
    recipe.prune = PruneConfig(final_keep=0.5, mode="protect")
    with pytest.raises(UserError, match="train.protect_last 32 protects every position of the shortest rows"):
        loop.finetune(recipe, tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()
    # without a lead every row is data.seq_len long (short recall documents are packed): allowed
    recipe = tiny_recipe(data_file, steps=1, protect_last=140)
    recipe.data.seq_len = 160
    recipe.data.recall = RecallMix(passkey=1.0, mqar=0.0, shortest=128)
    recipe.prune = PruneConfig(final_keep=0.5, mode="protect")
    loop.finetune(recipe, tmp_path / "no-lead", progress=False)
    recipe.data.recall = RecallMix(passkey=1.0, mqar=0.0, shortest=128, lead_steps=1, lead_len=128)
    with pytest.raises(UserError, match="shortest rows \\(128 tokens: data.seq_len, data.recall.shortest: the lead"):
        loop.finetune(recipe, tmp_path / "lead", progress=False)
    body = {"name": "r", "model": {"d_model": 16, "n_layer": 2, "d_state": 4}, "tokenizer": {"vocab_size": 300},
            "data": {"source": str(data_file), "seq_len": 32, "recall": {"pairs": [2, len(KEYS) + 1]}}}
    with pytest.raises(UserError, match=f"data.recall.pairs: numbers in 1..{len(KEYS)}"):
        recipe_from_dict(body)


def test_answer_loss_is_logged_only_for_steps_with_answers(data_file, tmp_path):
    """A step without recall answers logs no answer loss (null), not the last step's that had some."""
    body = {"name": "r", "model": {"d_model": 16, "n_layer": 2, "d_state": 4}, "tokenizer": {"vocab_size": 300},
            "data": {"source": str(data_file), "seq_len": 128, "val_tokens": 512,
                     "recall": {"share": 0.25, "passkey": 1.0, "mqar": 0.0, "shortest": 128}},
            "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2},
            "train": {"steps": 12, "batch_size": 2, "eval_every": 1000, "checkpoint_every": 100, "log_every": 1}}
    loop.finetune(recipe_from_dict(body), tmp_path / "run", progress=False)
    logged = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    answers = [r["answer_loss"] for r in logged if "loss" in r]
    assert any(a is None for a in answers) and any(a is not None for a in answers), answers
    assert all(a is None or a == a for a in answers)  # no NaN in the log
