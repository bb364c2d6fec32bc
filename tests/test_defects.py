import gzip
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simba_cli.cli import app
from simba_cli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_version_option_prints_the_version_and_exits_0():
    import simba_cli

    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"simba {simba_cli.version()}"
    assert simba_cli.version()[0].isdigit()
    bare = CliRunner().invoke(app, [])  # no arguments still shows the help
    assert "Usage" in bare.output and "prune" in bare.output


def test_version_falls_back_to_the_source_tree(monkeypatch):
    import importlib.metadata

    import simba_cli

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert simba_cli.version() == simba_cli.__version__


# --- binary data files ---

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


def random_bytes(n: int = 20000) -> bytes:
    return random.Random(0).randbytes(n)


@pytest.mark.parametrize("name, payload", [
    ("noise.txt", random_bytes()),
    ("noise", random_bytes()),
    ("noise.md", random_bytes().replace(b"\0", b"")),  # no NUL: most of it is not UTF-8
    ("book.txt", gzip.compress(TEXT.encode() * 5, mtime=0)),
])
def test_a_binary_file_is_not_training_text(tmp_path, name, payload):
    from simba_cli.data.corpus import load_texts

    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(UserError) as e:
        load_texts(str(path))
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "text file" in message


def test_a_binary_file_in_a_directory_is_named(tmp_path):
    from simba_cli.data.corpus import load_texts

    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_bytes(gzip.compress(TEXT.encode(), mtime=0))
    with pytest.raises(UserError) as e:
        load_texts(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "sub" / "b.md") in message and "text file" in message


def test_text_with_a_few_bad_bytes_still_loads(tmp_path):
    from simba_cli.data.corpus import load_texts

    path = tmp_path / "latin.txt"
    path.write_bytes(TEXT.replace("question", "qu\xe9stion").encode("latin-1"))
    docs = load_texts(str(path))
    assert docs and "qu\ufffdstion" in docs[0]


# --- lm-eval's own command line ---

def test_lm_eval_command_line_reports_a_user_error_in_one_line():
    from simba_cli.eval.tasks import build_tasks

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "simba_cli.lm_eval", "run", "--model", "simba", "--model_args",
                        "pretrained=/nonexistent", "--tasks", "simba_choice", "--include_path", str(build_tasks())],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "/nonexistent" in errors[0], r.stderr[-2000:]


# --- lm-eval hub tasks without the hub ---

_UNREACHABLE = """
import time
import lm_eval.tasks
from simba_cli.errors import UserError
from simba_cli.eval import harness

harness.hub_reachable = lambda: False
indexing = []

class TimedManager(lm_eval.tasks.TaskManager):  # indexing lm-eval's tasks is slow on a busy machine
    def __init__(self, *args, **kwargs):
        t = time.monotonic()
        super().__init__(*args, **kwargs)
        indexing.append(time.monotonic() - t)

lm_eval.tasks.TaskManager = TimedManager
t = time.monotonic()
try:
    harness.task_dict(["piqa"])
    print("loaded")
except UserError as e:
    print(f"{time.monotonic() - t - sum(indexing):.2f}")
    print(e)
"""


def test_hub_task_without_the_hub_fails_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(ROOT), TQDM_DISABLE="1", HF_HOME=str(tmp_path / "hf"),
               HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"))
    r = subprocess.run([sys.executable, "-c", _UNREACHABLE], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, r.stdout + r.stderr[-2000:]
    seconds, message = float(lines[0]), lines[1]
    assert seconds < 10, r.stdout + r.stderr[-2000:]
    assert message.startswith("cannot load lm-eval task(s) piqa") and "simba_choice" in message
    assert "Retrying" not in r.stderr


def test_hub_reachable_is_false_in_offline_mode(monkeypatch):
    from simba_cli.eval import harness

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert harness.hub_reachable() is False


def test_offline_tasks_never_ask_for_the_hub(monkeypatch):
    from simba_cli.eval import harness

    def no_hub():
        raise AssertionError("the offline tasks asked whether the hub is reachable")

    monkeypatch.setattr(harness, "hub_reachable", no_hub)
    loaded = harness.task_dict(["simba_choice"])
    assert list(loaded["tasks"]) == ["simba_choice"]


# --- what a new user met: each of these ended in a traceback, was silently taken, or blocked a rerun ---

def _one_line_error(r, *words):
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert all(w in r.output for w in words), r.output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from simba_cli.data.bpe import train_bpe
    from simba_cli.models.checkpoint import save_checkpoint
    from tests.conftest import random_model, tiny_config
    from tests.test_eval import TEXT

    return save_checkpoint(random_model(tiny_config(vocab_size=304, n_layer=4), seed=3),
                           tmp_path_factory.mktemp("m") / "hf", tokenizer=train_bpe(TEXT, 300))


def test_every_command_given_out_naming_a_file_exits_2_with_one_line(model_dir, tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("a user's file")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: {source: shakespeare, seq_len: 32}\ntrain: {steps: 1}\n")
    for args in (["prune", str(model_dir)], ["eval", str(model_dir), "--tasks", "simba_choice"],
                 ["compare", "--models", str(model_dir)], ["flops-report", "mamba-130m"],
                 ["finetune", str(model_dir), "--recipe", str(recipe)]):
        _one_line_error(CliRunner().invoke(app, [*args, "--out", str(a_file)]), "is a file")
        # a directory that cannot be created (under the file): refused before any work, nothing left behind
        _one_line_error(CliRunner().invoke(app, [*args, "--out", str(a_file / "sub" / "dir")]),
                        f"cannot be created: {a_file} is a file")
    assert a_file.read_text() == "a user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml",
                                                                                                   "results.txt"]


def test_eval_limit_must_be_positive(model_dir):
    for limit in ("0", "-3"):
        _one_line_error(CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "simba_choice", "--limit", limit]),
                        "--limit must be at least 1")


def test_compare_recipes_with_wrongly_typed_values(tmp_path):
    for body, words in (("limit: many\n", ["limit must be int", "'many'"]),
                        ("final_keeps: 0.1\n", ["final_keeps must be a list"]),
                        ("criteria: [simba, 3]\n", ["criteria[1] must be str"]),
                        ("match_flops: maybe\n", ["match_flops must be bool"]),
                        ("", ["is empty"]), ("- a\n- b\n", ["must be a mapping"])):
        path = tmp_path / "c.yaml"
        path.write_text(body)
        _one_line_error(CliRunner().invoke(app, ["compare", "--recipe", str(path), "--out", str(tmp_path / "o")]),
                        *words)
        assert not (tmp_path / "o").exists()


def test_an_empty_recipe_does_not_start_a_default_run(model_dir, tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    r = CliRunner().invoke(app, ["finetune", str(model_dir), "--recipe", str(tmp_path / "empty.yaml"),
                                 "--out", str(tmp_path / "run")])
    _one_line_error(r, "is empty")
    assert not (tmp_path / "run").exists()


def test_generate_asks_for_cuda_without_cuda(model_dir, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(app, ["generate", str(model_dir), "--prompt", "To be", "--device", "cuda"])
    _one_line_error(r, "no CUDA device")


def test_perplexity_longer_than_the_held_out_text_fails_before_any_task(model_dir, tmp_path, monkeypatch):
    from simba_cli.eval import harness

    def no_task_may_run(*a, **k):
        raise AssertionError("a task ran before the perplexity settings were checked")

    monkeypatch.setattr(harness, "run_tasks", no_task_may_run)
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 40)
    r = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "simba_choice", "--limit", "2",
                                 "--ppl-contexts", "4096", "--ppl-data", str(text)])
    _one_line_error(r, "too few for 16 windows of 4096", "short.txt")


def test_a_compare_that_fails_on_an_unknown_model_or_task_leaves_nothing(model_dir, tmp_path):
    out = tmp_path / "out"
    _one_line_error(CliRunner().invoke(app, ["compare", "--models", str(tmp_path / "nope"), "--out", str(out)]))
    assert not out.exists()
    _one_line_error(CliRunner().invoke(app, ["compare", "--models", str(model_dir), "--tasks", "no_such_task_xyz",
                                             "--out", str(out)]), "no_such_task_xyz")
    assert not out.exists()


def test_a_compare_with_nothing_finished_resumes_with_other_settings(tmp_path):
    """A run that wrote its compare.yaml but finished no evaluation holds nothing to protect."""
    from simba_cli.eval.compare import CompareSpec, prepare_out

    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    (out / "compare.yaml").write_text("models: [zoo-s]\nlimit: 7\n")
    spec = CompareSpec(models=["zoo-s"], limit=5)
    assert prepare_out(out, spec, resume=True) is False
    assert CompareSpec.from_yaml(out / "compare.yaml") == spec
    (out / "parts" / "done.json").write_text("{}")
    with pytest.raises(UserError, match="differ"):
        prepare_out(out, CompareSpec(models=["zoo-s"], limit=9), resume=True)


def test_generation_stopped_at_eos_does_not_return_the_marker(model_dir, monkeypatch):
    """lm-eval's `hf` model leaves the end-of-text token out of a generation; exact match depends on it."""
    import torch
    from lm_eval.api.instance import Instance

    from simba_cli.eval.lm import SimbaLM
    from simba_cli.models import decode

    lm = SimbaLM(pretrained=str(model_dir), device="cpu")
    eos, word = lm.eot_token_id, lm.tok_encode(" be")
    monkeypatch.setattr(decode, "generate", lambda *a, **k: torch.tensor([word + [eos, eos]]))
    req = Instance("generate_until", {}, ("To be, or not to", {"until": ["\n\n"], "max_gen_toks": 8}), 0)
    assert lm.generate_until([req]) == [" be"]


def test_max_length_is_lm_evals_hf_choice_and_long_documents_score_alike(model_dir):
    """Mamba configs name no maximum length: like lm-eval's `hf` model, the tokenizer's model_max_length
    (the zoo's says 1,000,000) or else 2048. A context of 2,500 tokens is scored whole by both."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import TOKENIZER_INFINITY

    from simba_cli.eval.lm import SimbaLM

    ours, hf = SimbaLM(pretrained=str(model_dir), device="cpu"), HFLM(pretrained=str(model_dir), device="cpu")
    assert ours.max_length == hf.max_length == 1_000_000
    ours.tokenizer.model_max_length = TOKENIZER_INFINITY
    assert ours.max_length == 2048
    ours.tokenizer.model_max_length = 1_000_000
    context = "To be, or not to be, that is the question. " * 250
    assert len(ours.tok_encode(context)) > 2048
    req = [Instance("loglikelihood", {}, (context, " Whether"), 0)]
    (a, _), (b, _) = ours.loglikelihood(req)[0], hf.loglikelihood(req)[0]
    assert a == pytest.approx(b, abs=1e-3)


def test_saved_models_are_readable_by_other_users(tmp_path):
    from simba_cli.models.checkpoint import save_checkpoint
    from tests.conftest import random_model

    old = os.umask(0o022)
    try:
        target = save_checkpoint(random_model(), tmp_path / "model")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in target.iterdir())


def test_eval_perplexity_on_a_users_own_text(tmp_path):
    """`simba eval zoo-s --ppl-contexts 256 --ppl-data some.txt`: the protocol on any local text."""
    text = tmp_path / "some.txt"
    text.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(3000)))
    out = tmp_path / "ppl"
    r = CliRunner().invoke(app, ["eval", "zoo-s", "--tasks", "", "--ppl-contexts", "256", "--ppl-data", str(text),
                                 "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["ppl_data"] == str(text) and res["perplexity"][0]["context"] == 256
    assert 1 < res["perplexity"][0]["ppl"] < float("inf")  # a text far from the plays: no bound on its quality
    assert "some.txt" in (out / "results.md").read_text()


def test_eval_prints_narrow_tables_and_no_lm_eval_bars(model_dir):
    """As a user runs it (a process of its own): lm-eval's tqdm bars and bootstrapping lines stay out; the
    tables fit 80 columns; the progress bar goes to stderr."""
    r = subprocess.run([sys.executable, "-m", "simba_cli.cli", "eval", str(model_dir), "--tasks",
                        "simba_cloze,simba_choice", "--limit", "2"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    both = r.stdout + r.stderr
    assert "Tokenizing" not in both and "bootstrapping" not in both and "it/s" not in both, both
    assert max(len(line) for line in r.stdout.splitlines()) <= 80, r.stdout
    assert "acc_norm" in r.stdout and "stderr" in r.stdout and "mean keep" in r.stdout


def test_the_layers_import_downwards_only():
    """simba/ (the core) never imports report/ (or eval, train); eval/ never imports train/."""
    import ast

    rules = {"simba": ("simba_cli.report", "simba_cli.eval", "simba_cli.train", "simba_cli.cli"),
             "models": ("simba_cli.report", "simba_cli.eval", "simba_cli.train", "simba_cli.cli"),
             "eval": ("simba_cli.train", "simba_cli.cli")}
    for package, forbidden in rules.items():
        for path in (ROOT / "simba_cli" / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                bad = [n for n in names if n.startswith(forbidden)]
                assert not bad, f"{path.name} imports {bad}"


def test_generate_rejects_bad_sampling_options_in_one_line(model_dir):
    for args, words in ((["--top-p", "0"], "top_p"), (["--top-p", "1.5"], "top_p"),
                        (["--max-new-tokens", "0"], "max_new_tokens"), (["--temperature", "-1"], "temperature")):
        r = CliRunner().invoke(app, ["generate", str(model_dir), "--prompt", "To be", *args])
        _one_line_error(r, words)


def test_prune_never_writes_among_a_users_files_and_leaves_nothing_on_a_bad_setting(model_dir, tmp_path):
    users = tmp_path / "notes"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    _one_line_error(CliRunner().invoke(app, ["prune", str(model_dir), "--out", str(users)]), "no simba.yaml")
    assert sorted(p.name for p in users.iterdir()) == ["notes.txt"]
    fresh = tmp_path / "fresh"
    _one_line_error(CliRunner().invoke(app, ["prune", str(model_dir), "--out", str(fresh), "--seq-len", "1"]),
                    "too short")
    assert not fresh.exists()
    assert CliRunner().invoke(app, ["prune", str(model_dir), "--out", str(fresh)]).exit_code == 0
    _one_line_error(CliRunner().invoke(app, ["prune", str(model_dir), "--out", str(fresh)]), "--overwrite")
    assert CliRunner().invoke(app, ["prune", str(model_dir), "--out", str(fresh), "--overwrite"]).exit_code == 0


def test_recipes_that_are_not_text_are_one_line_errors(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xd0\xcf\x11\xe0 binary")
    _one_line_error(CliRunner().invoke(app, ["finetune", str(model_dir), "--recipe", str(recipe),
                                             "--out", str(tmp_path / "f")]), "not UTF-8")
    _one_line_error(CliRunner().invoke(app, ["compare", "--recipe", str(recipe), "--out", str(tmp_path / "c")]),
                    "not UTF-8")
    assert not (tmp_path / "f").exists() and not (tmp_path / "c").exists()


def test_recipe_values_out_of_range(tmp_path):
    from simba_cli.train.recipe import recipe_from_dict

    for body, words in (({"optim": {"weight_decay": -0.1}}, "weight_decay"),
                        ({"data": {"val_tokens": 0}}, "val_tokens"),
                        ({"data": {"recall": {"shortest": 0, "lead_len": 0}}}, "shortest")):
        with pytest.raises(UserError, match=words):
            recipe_from_dict({"name": "r", **body}, "r")
    with pytest.raises(UserError, match="match_seq_len"):
        from simba_cli.eval.compare import CompareSpec

        CompareSpec(models=["zoo-s"], match_seq_len=1)


def test_finetune_checks_the_schedule_and_recall_documents_before_touching_out(model_dir, tmp_path):
    """An --overwrite of an earlier run keeps that run when the new recipe cannot run on this model."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.yaml").write_text("name: earlier\n")
    (out / "model.safetensors").write_text("earlier weights")
    data = "data: {source: shakespeare, seq_len: 64, val_tokens: 256"
    cases = ((f"{data}}}\nprune: {{schedule: linear, final_keep: 0.5, first_layer: 8}}\n", "first_layer 8"),
             (f"{data}, recall: {{shortest: 8, lead_len: 64}}}}\n", "cannot hold one fact"))
    for body, words in cases:
        recipe = tmp_path / "r.yaml"
        recipe.write_text("train: {steps: 1}\n" + body)
        _one_line_error(CliRunner().invoke(app, ["finetune", str(model_dir), "--recipe", str(recipe), "--out",
                                                 str(out), "--overwrite", "--quiet"]), words)
        assert (out / "model.safetensors").read_text() == "earlier weights"


def test_a_compare_whose_perplexity_text_is_too_short_stops_before_any_evaluation(model_dir, tmp_path, monkeypatch):
    from simba_cli.eval import harness

    def no_task_may_run(*a, **k):
        raise AssertionError("a task ran before the perplexity settings were checked")

    monkeypatch.setattr(harness, "run_tasks", no_task_may_run)
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"models: ['{model_dir}']\ntasks: [simba_choice]\nlimit: 2\nmatch_flops: false\n"
                      f"ppl_contexts: [10000000]\n")
    _one_line_error(CliRunner().invoke(app, ["compare", "--recipe", str(recipe), "--out", str(tmp_path / "o")]),
                    "too few for 8 windows of 10000000", "ppl_contexts")
    assert not (tmp_path / "o").exists()


def test_eval_needs_something_to_evaluate_and_a_possible_number_of_shots(model_dir):
    _one_line_error(CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", ""]), "nothing to evaluate")
    for shots, words in (("-1", "0 or more"), ("100000", "few-shot pool")):
        _one_line_error(CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "simba_choice", "--limit", "2",
                                                 "--num-fewshot", shots]), words)


def test_resume_drops_a_log_line_cut_short_by_a_kill(tmp_path):
    from simba_cli.train.loop import _truncate_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 10, "loss": 3.0}\n\n{"step": 20, "loss": 2.9}\n{"step": 30, "loss": 2.8}\n{"step": 4')
    _truncate_log(log, 20)
    assert log.read_text() == '{"step": 10, "loss": 3.0}\n{"step": 20, "loss": 2.9}\n'


def test_datasets_with_their_own_splits_read_test_for_evaluation(tmp_path, monkeypatch):
    """hf:NAME goes through datasets.load_dataset as for a hub dataset; a local directory of split files is that
    path offline. A saved DatasetDict too. evaluation reads their test split."""
    import datasets

    from simba_cli.data.corpus import load_texts

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    files = tmp_path / "files"
    files.mkdir()
    splits = {"train": "train", "validation": "validation", "evaluation": "test"}
    for split in splits.values():
        (files / f"{split}.jsonl").write_text("".join(f'{{"text": "{split} doc {i}"}}\n' for i in range(3)))
    saved = tmp_path / "saved"
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": [f"{s} doc {i}" for i in range(3)]})
                          for s in splits.values()}).save_to_disk(str(saved))
    for ours, theirs in splits.items():
        want = [f"{theirs} doc {i}" for i in range(3)]
        assert load_texts(f"hf:{files}", ours) == want
        assert load_texts(str(saved), ours) == want
    (files / "test.jsonl").unlink()
    with pytest.raises(UserError, match="no 'test' split"):
        load_texts(f"hf:{files}", "evaluation")
    # a single saved Dataset is split here, like a folder of files: disjoint parts, every document in one
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(40)]}).save_to_disk(str(single))
    parts = {split: load_texts(str(single), split) for split in splits}
    assert [len(p) for p in parts.values()] == [36, 2, 2]
    assert set().union(*map(set, parts.values())) == {f"document {i}" for i in range(40)}


def test_eval_measured_counts_the_perplexity_forwards(model_dir):
    from simba_cli.eval.harness import evaluate_model

    r = evaluate_model(str(model_dir), [], ppl_contexts=[48, 64], ppl_score_last=16, ppl_windows=3, batch_size=2,
                       prune={"schedule": "linear", "final_keep": 0.5})
    assert r["measured"]["forwards"] == 4  # two batches of windows at each of two contexts
    assert r["measured"]["flops"] == sum(row["flops"] for row in r["perplexity"])


def test_compare_refuses_a_model_or_task_listed_twice(tmp_path):
    """Listed twice, a model would be evaluated twice and its comparisons counted twice in the pooled z."""
    for args, words in ((["--models", "zoo-xxxs,zoo-xxxs"], "models lists zoo-xxxs more than once"),
                        (["--models", "zoo-xxxs", "--tasks", "simba_choice,simba_choice"], "tasks lists simba_choice")):
        _one_line_error(CliRunner().invoke(app, ["compare", *args, "--out", str(tmp_path / "o")]), words)
        assert not (tmp_path / "o").exists()


def test_finetune_refuses_a_model_section_beside_a_model_to_continue(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {d_model: 16, n_layer: 2}\ndata: {source: shakespeare, seq_len: 32}\ntrain: {steps: 1}\n")
    _one_line_error(CliRunner().invoke(app, ["finetune", str(model_dir), "--recipe", str(recipe), "--out",
                                             str(tmp_path / "run")]), "model section", "MODEL")
    assert not (tmp_path / "run").exists()


def test_flops_match_says_when_no_pruning_is_needed():
    r = CliRunner().invoke(app, ["flops-match", "mamba-130m", "--target", "mamba-370m"])
    assert r.exit_code == 0 and r.output.startswith("no pruning needed: mamba-130m dense already costs"), r.output


def test_flops_report_csv_is_one_table(tmp_path):
    _one_line_error(CliRunner().invoke(app, ["flops-report", "mamba-130m", "--per-layer", "--format", "csv"]),
                    "--format csv prints one table")
    r = CliRunner().invoke(app, ["flops-report", "mamba-130m", "--per-layer", "--format", "csv", "--out",
                                 str(tmp_path / "f")])
    assert r.exit_code == 0 and len({ln.count(",") for ln in r.stdout.strip().splitlines()}) == 1, r.stdout
    assert (tmp_path / "f" / "layers.csv").is_file()


def test_a_dense_schedule_with_pruning_options_is_refused(model_dir):
    """--schedule none beside options that only a pruning schedule reads: refused, not silently dense."""
    r = CliRunner().invoke(app, ["eval", str(model_dir), "--tasks", "simba_choice", "--schedule", "none",
                                 "--final-keep", "0.3", "--criterion", "recent"])
    _one_line_error(r, "--schedule none runs the dense model, so --final-keep, --criterion would have no effect")
    dense_copy = model_dir.parent / "dense-copy"
    _one_line_error(CliRunner().invoke(app, ["prune", str(model_dir), "--schedule", "none", "--out", str(dense_copy)]),
                    "--schedule none would be the dense")
    assert not dense_copy.exists()
    from simba_cli.eval.lm import SimbaLM  # lm-eval's model arguments, spelt as lm-eval users write them

    with pytest.raises(UserError, match="schedule none runs the dense model, so final_keep would have no effect"):
        SimbaLM(pretrained=str(model_dir), schedule="none", final_keep="0.3")
    assert SimbaLM(pretrained=str(model_dir), schedule="none").runner.config.dense
    from simba_cli.simba.settings import PruneConfig

    assert PruneConfig("truncate", 0.5).describe() == "truncate(final_keep=0.5, first_layer=1)"  # no criterion
    assert PruneConfig("linear", 0.5, criterion="recent").describe().endswith(") by recent")


def test_a_recipe_that_is_not_yaml_names_the_line(model_dir, tmp_path):
    """A YAML syntax error in a finetune or compare recipe: one line that says where, nothing written."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: shakespeare, seq_len: 32\ntrain: {steps: 1}\n")
    for args in (["finetune", str(model_dir)], ["compare"]):
        r = CliRunner().invoke(app, [*args, "--recipe", str(bad), "--out", str(tmp_path / "out")])
        _one_line_error(r, "is not valid YAML: expected ',' or '}', but got ':' (line 2, column 6)")
    assert not (tmp_path / "out").exists()


def test_perplexity_windows_may_not_score_a_token_twice():
    """Windows end at evenly spaced positions; their scored tokens (the last score_last of each) must all differ,
    or one token would count in several windows. 200 tokens hold 5 windows of 64 scoring 32 each, not 6."""
    import torch

    from simba_cli.eval.perplexity import check_stream

    stream = torch.arange(200)
    check_stream(stream, [32, 64], 5, 32)
    check_stream(stream, [64], 136, 1)
    with pytest.raises(UserError, match=r"too few for 6 windows of 64 that score different tokens \(the last 32 of "
                                        r"each: 225 needed\)"):
        check_stream(stream, [64], 6, 32)
    from simba_cli.eval.perplexity import window_ends

    big = 2**25 + 3  # past float32's exact integers: the last window still ends at the last token
    assert window_ends(big, 1024, 7)[-1] == big - 1 and window_ends(200, 64, 5) == [64, 97, 131, 165, 199]


def test_flops_report_of_an_unknown_name_lists_the_official_sizes():
    r = CliRunner().invoke(app, ["flops-report", "falcon-mamba-7b"])
    _one_line_error(r, "no model 'falcon-mamba-7b'", "without weights: mamba-130m", "mamba2-2.7b")


def test_the_held_out_text_is_named_as_it_was_read(tmp_path, monkeypatch):
    """The built-in corpus stays 'shakespeare' even beside a folder of that name; a user's path is made absolute,
    ~ expanded."""
    import torch

    from simba_cli.eval.harness import _stream_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shakespeare").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    stream = torch.arange(10)
    assert _stream_id(stream, "shakespeare")["source"] == "shakespeare"
    assert _stream_id(stream, "~/books")["source"] == str(tmp_path / "books")
    assert _stream_id(stream, "hf:org/set")["source"] == "hf:org/set" and _stream_id(None, "shakespeare") is None
    assert _stream_id(stream, "x")["sha256"] != _stream_id(torch.arange(11), "x")["sha256"]


def test_usage_errors_are_one_line_too():
    """The `simba` command itself (not only its functions): a missing option, a mistyped command or a value of the
    wrong type is one line on stderr with exit code 2; the command alone prints its help."""
    import subprocess
    import sys

    def simba(*args):
        return subprocess.run([sys.executable, "-m", "simba_cli.cli", *args], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})

    for args, words in ((["prune", "zoo-xxxs"], "Missing option '--out'"), (["evall"], "No such command 'evall'"),
                        (["eval", "zoo-xxxs", "--limit", "x"], "Invalid value for '--limit'")):
        r = simba(*args)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r
    alone = simba()
    assert alone.returncode == 0 and "Usage" in alone.stdout + alone.stderr and "prune" in alone.stdout + alone.stderr
