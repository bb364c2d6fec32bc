"""The lm-eval model `simba` against lm-eval's own `hf` model, protected continuations, the eval command."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from simba_cli.cli import app
from simba_cli.data.bpe import train_bpe
from simba_cli.models.checkpoint import save_checkpoint
from tests.conftest import random_model, tiny_config

TEXT = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3,
        "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 3]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random Mamba in Hugging Face format with its own local tokenizer."""
    tok = train_bpe(TEXT, 300)
    model = random_model(tiny_config(vocab_size=304, n_layer=4), seed=3)
    return save_checkpoint(model, tmp_path_factory.mktemp("m") / "hf", fmt="hf", tokenizer=tok)


def requests(n=6):
    from lm_eval.api.instance import Instance

    pairs = [("To be, or not", " to be"), ("Now is the winter", " of our discontent"),
             ("Whether 'tis nobler in the mind", " to suffer"), ("Made glorious", " summer by this sun"),
             ("that is the", " question"), ("of York", ";")]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs[:n])]


def test_schedule_none_equals_lm_evals_hf_model(hf_dir):
    from lm_eval.models.huggingface import HFLM

    from simba_cli.eval.lm import SimbaLM

    ours = SimbaLM(pretrained=str(hf_dir), batch_size=3, device="cpu").loglikelihood(requests())
    theirs = HFLM(pretrained=str(hf_dir), batch_size=3, device="cpu").loglikelihood(requests())
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4)
        assert ga == gb


@torch.no_grad()
def test_protected_continuations_get_dense_logits_without_pruning(hf_dir):
    """Schedule none, protect mode: the continuation's logits equal the dense forward's."""
    from simba_cli.eval.lm import SimbaLM

    lm = SimbaLM(pretrained=str(hf_dir), batch_size=8, device="cpu")
    reqs = requests()
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (ll, _) in zip((r.args for r in reqs), got):
        c, t = lm._encode_pair(ctx, cont)
        ids = torch.tensor([c + t])
        logp = torch.log_softmax(lm.model(ids[:, :-1])[0, -len(t):], -1)
        assert ll == pytest.approx(float(logp.gather(1, torch.tensor(t)[:, None]).sum()), abs=1e-4)


def test_pruned_scoring_protects_the_continuation_and_counts_flops(hf_dir):
    from simba_cli.eval.lm import SimbaLM

    lm = SimbaLM(pretrained=str(hf_dir), batch_size=4, device="cpu", schedule="linear", final_keep=0.2,
                 criterion="simba")
    reqs = requests()
    results = lm.loglikelihood(reqs)
    # each request by hand, alone: the positions that predict the continuation protected, their logits read
    from simba_cli.simba.pruned import pruned_forward
    from simba_cli.simba.settings import PruneConfig

    config = PruneConfig("linear", 0.2, criterion="simba", mode="protect")
    for (ctx, cont), (ll, _) in zip((r.args for r in reqs), results):
        c, t = lm._encode_pair(ctx, cont)
        ids = torch.tensor([c + t])
        protected = torch.zeros(1, ids.shape[1] - 1, dtype=torch.bool)
        protected[0, len(c) - 1:] = True
        with torch.no_grad():
            out = pruned_forward(lm.model, ids[:, :-1], config, protected=protected, trace=True)
        assert set(range(len(c) - 1, ids.shape[1] - 1)) <= set(out.kept[-1][0].tolist())  # never pruned
        logp = torch.log_softmax(out.logits[0, -len(t):].float(), -1)
        assert ll == pytest.approx(float(logp.gather(1, torch.tensor(t)[:, None]).sum()), abs=1e-4)
    m = lm.measured()
    assert m["keep_ratios"][0] == 1 and m["keep_ratios"][-1] < 0.8  # it pruned, and says how much
    assert m["flops"] > 0 and m["forwards"] == 2


def test_rolling_loglikelihood_schedule_none_equals_lm_evals_hf_model(hf_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from simba_cli.eval.lm import SimbaLM

    reqs = [Instance("loglikelihood_rolling", {}, (t[:150],), i) for i, t in enumerate(TEXT)]
    ours = SimbaLM(pretrained=str(hf_dir), batch_size=2, device="cpu", max_length=16).loglikelihood_rolling(reqs)
    theirs = HFLM(pretrained=str(hf_dir), batch_size=2, device="cpu", max_length=16).loglikelihood_rolling(reqs)
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-3)


def test_generate_until_equals_lm_evals_hf_model_and_runs_pruned(hf_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from simba_cli.eval.lm import SimbaLM

    kwargs = {"max_gen_toks": 6, "until": ["zzz"], "do_sample": False}
    reqs = [Instance("generate_until", {}, (TEXT[0][:80], kwargs), 0)]
    lm = SimbaLM(pretrained=str(hf_dir), device="cpu")
    ours = lm.generate_until(reqs)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu").generate_until(reqs)
    assert ours == theirs
    # FLOPs: the prompt's layers and one head row, then a dense step per further token (6 generated here)
    from simba_cli.simba.flops import count_head, count_layer, dense_flops_per_token

    cfg, n = lm.model.cfg, len(lm.tok_encode(TEXT[0][:80]))
    by_hand = cfg.n_layer * count_layer(cfg, n) + count_head(cfg, 1) + 5 * dense_flops_per_token(cfg)
    assert lm.measured()["flops"] == by_hand
    small = SimbaLM(pretrained=str(hf_dir), device="cpu", schedule="linear", final_keep=0.3)
    pruned = small.generate_until(reqs)
    assert isinstance(pruned[0], str)
    assert 0 < small.measured()["flops"] < by_hand and small.measured()["mean_keep"] < 1
    # a stop string met on the way: the same text as `hf`, and decoding stopped there (fewer FLOPs)
    text = ours[0]
    assert len(text) >= 2, text  # six tokens of a random model: some text to stop in
    stop = text[len(text) // 2]
    kwargs = {"max_new_tokens": 6, "until": [stop]}  # lm-eval's other name for max_gen_toks
    reqs = [Instance("generate_until", {}, (TEXT[0][:80], kwargs), 0)]
    early = SimbaLM(pretrained=str(hf_dir), device="cpu")
    assert early.generate_until(reqs) == HFLM(pretrained=str(hf_dir), device="cpu").generate_until(reqs)
    assert early.measured()["flops"] < by_hand


def test_generation_arguments_are_read_as_lm_eval_reads_them(hf_dir, monkeypatch):
    """A temperature without do_sample samples (lm-eval's normalize_gen_kwargs); top_p, top_k and the other names
    of max_gen_toks reach the decoder."""
    from lm_eval.api.instance import Instance

    from simba_cli.eval.lm import SimbaLM

    lm = SimbaLM(pretrained=str(hf_dir), device="cpu")
    asked = {}

    def record(ids, max_new, temperature, top_p, top_k=0, stop=None):
        asked.update(max_new=max_new, temperature=temperature, top_p=top_p, top_k=top_k)
        return []

    monkeypatch.setattr(lm.runner, "generate_ids", record)
    kwargs = {"temperature": 0.7, "max_new_tokens": 3, "top_p": 0.9, "top_k": 5, "until": ["\n"]}
    lm.generate_until([Instance("generate_until", {}, ("To be", kwargs), 0)])
    assert asked == {"max_new": 3, "temperature": 0.7, "top_p": 0.9, "top_k": 5}
    lm.generate_until([Instance("generate_until", {}, ("To be", {"temperature": 0.7, "do_sample": False}), 0)])
    assert asked["temperature"] == 0.0 and asked["max_new"] == 256


def test_offline_lm_eval_run_and_results_schema(hf_dir, tmp_path):
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["eval", str(hf_dir), "--tasks", "simba_choice,simba_cloze", "--limit", "3",
                                 "--schedule", "linear", "--final-keep", "0.5", "--ppl-contexts", "48,64",
                                 "--ppl-score-last", "16", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"model", "prune", "setting", "tasks", "perplexity", "measured", "provenance"}
    assert res["prune"]["final_keep"] == 0.5
    choice = res["tasks"]["simba_choice"]
    assert set(choice["metrics"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert choice["docs"] == 3 and choice["flops_per_doc"] > 0
    assert len(choice["measured"]["keep_ratios"]) == 4 and choice["measured"]["keep_ratios"][0] == 1
    m = choice["measured"]  # per layer too: each block, each layer's criterion (none on the last), the head
    assert len(m["flops_per_layer"]) == len(m["criterion_flops_per_layer"]) == 4
    assert sum(m["flops_per_layer"]) + sum(m["criterion_flops_per_layer"]) + m["head_flops"] == m["flops"]
    assert m["criterion_flops_per_layer"][0] > 0 and m["criterion_flops_per_layer"][-1] == 0
    assert m["flops_per_layer"][0] > m["flops_per_layer"][-1]  # the pruned layers see fewer tokens
    assert {"perplexity", "acc"} <= set(res["tasks"]["simba_cloze"]["metrics"])
    assert [p["context"] for p in res["perplexity"]] == [48, 64]
    assert res["provenance"]["versions"]["torch"]
    # an existing output directory is not overwritten without --overwrite
    again = CliRunner().invoke(app, ["eval", str(hf_dir), "--tasks", "simba_choice", "--limit", "2", "--out", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert (out / "results.csv").is_file() and (out / "perplexity.csv").is_file()
    # --overwrite with perplexity only: no table of the earlier run is left behind
    ppl_only = CliRunner().invoke(app, ["eval", str(hf_dir), "--tasks", "", "--ppl-contexts", "48",
                                        "--ppl-score-last", "16", "--out", str(out), "--overwrite"])
    assert ppl_only.exit_code == 0, ppl_only.output
    assert not (out / "results.csv").exists() and (out / "perplexity.csv").is_file()


def test_unknown_task_lists_the_known_ones(hf_dir):
    r = CliRunner().invoke(app, ["eval", str(hf_dir), "--tasks", "no_such_task_xyz", "--limit", "2"])
    assert r.exit_code == 2
    assert "no_such_task_xyz" in r.output and "simba_cloze" in r.output and "Traceback" not in r.output


def test_lm_eval_python_api_finds_the_registered_model(hf_dir):
    import lm_eval

    import simba_cli.eval.lm  # noqa: F401
    from simba_cli.eval.tasks import build_tasks

    tm = lm_eval.tasks.TaskManager(include_path=str(build_tasks()), include_defaults=False)
    res = lm_eval.simple_evaluate(model="simba", model_args=f"pretrained={hf_dir},schedule=linear,final_keep=0.5",
                                  tasks=["simba_recall"], limit=2, task_manager=tm, device="cpu")
    assert "acc,none" in res["results"]["simba_recall"]


def test_lm_evals_own_command_line_as_in_the_readme(hf_dir):
    """lm-eval asks for cuda:0 by default; without CUDA the model runs on the CPU. What ran is reported."""
    from simba_cli.eval.tasks import build_tasks

    r = subprocess.run([sys.executable, "-m", "simba_cli.lm_eval", "run", "--model", "simba", "--model_args",
                        f"pretrained={hf_dir},schedule=linear,final_keep=0.5", "--tasks", "simba_choice",
                        "--include_path", str(build_tasks()), "--limit", "2"],
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "simba_choice" in r.stdout and "FLOPs measured in" in r.stdout and "mean keep" in r.stdout


def test_generate_command_with_a_pruned_prefill(hf_dir):
    r = CliRunner().invoke(app, ["generate", str(hf_dir), "--prompt", TEXT[1][:60], "--max-new-tokens", "4",
                                 "--schedule", "linear", "--final-keep", "0.3"])
    assert r.exit_code == 0, r.output
    # the text alone on stdout, the decoder's own tokens after a pruned prefill; what ran on stderr
    from simba_cli.models.decode import generate
    from simba_cli.models.loading import load_model
    from simba_cli.simba.pruned import pruned_prefill
    from simba_cli.simba.settings import PruneConfig

    loaded = load_model(str(hf_dir))
    tok = loaded.tokenizer
    ids = torch.tensor([tok.encode(TEXT[1][:60], add_special_tokens=False)])
    with torch.no_grad():
        new = generate(loaded.model, ids, 4, prefill_fn=pruned_prefill(PruneConfig("linear", 0.3)),
                       eos_token_id=tok.eos_token_id)[0].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert r.stdout == tok.decode(new) + "\n"
    assert "prefill linear(final_keep=0.3" in r.stderr and "FLOPs measured" in r.stderr
    empty = CliRunner().invoke(app, ["generate", str(hf_dir), "--prompt", ""])
    assert empty.exit_code == 2 and "prompt" in empty.output


def test_generate_command_samples_by_its_seed(hf_dir):
    """--temperature 0 is greedy whatever the seed; sampling gives the same text for the same --seed, and
    (at temperature 2 over 24 tokens of a random model) another text for another seed."""
    def text(*options):
        r = CliRunner().invoke(app, ["generate", str(hf_dir), "--prompt", TEXT[1][:60], "--max-new-tokens", "24",
                                     *options])
        assert r.exit_code == 0, r.output
        return r.stdout

    greedy = text()
    assert text("--temperature", "0", "--seed", "5") == greedy
    sampled = text("--temperature", "2", "--seed", "1")
    assert text("--temperature", "2", "--seed", "1") == sampled
    assert text("--temperature", "2", "--seed", "2") != sampled and sampled != greedy


def test_few_shot_examples_are_the_same_in_every_run(hf_dir):
    """Paired differences between settings need the same prompts: lm-eval's few-shot sampler is seeded."""
    from simba_cli.eval.harness import run_tasks
    from simba_cli.eval.lm import SimbaLM

    lm = SimbaLM(pretrained=str(hf_dir), batch_size=4, device="cpu")
    prompts = []
    for _ in range(2):
        r = run_tasks(lm, ["simba_choice"], limit=2, num_fewshot=2, log_samples=True, bootstrap_iters=0)
        prompts.append([a["arguments"] for a in r["samples"]["simba_choice"]])
    assert prompts[0] == prompts[1]
    zero = run_tasks(lm, ["simba_choice"], limit=2, num_fewshot=0, log_samples=True, bootstrap_iters=0)
    bare = zero["samples"]["simba_choice"][0]["arguments"][0][0]
    shot = prompts[0][0][0][0]
    assert shot.endswith(bare) and len(shot) > len(bare)  # the shots are really there, before the question


def test_eval_checks_device_and_perplexity_settings_before_any_work(hf_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [(["--device", "cuda"], "no CUDA device"), (["--device", "tpu7"], "unknown device"),
             (["--device", "mps"], "not supported"), (["--device", "meta"], "not supported"),
             (["--batch-size", "0"], "batch_size"),
             (["--ppl-contexts", "32", "--ppl-score-last", "64"], "--ppl-score-last 64")]
    for args, words in cases:
        r = CliRunner().invoke(app, ["eval", str(hf_dir), "--tasks", "simba_choice", "--limit", "2", *args])
        assert r.exit_code == 2 and r.output.startswith("error: ") and words in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output


def test_metrics_of_different_filters_stay_apart():
    from simba_cli.eval.harness import flat_metrics

    got = flat_metrics({"results": {"gsm8k": {
        "alias": "gsm8k", "exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.01,
        "exact_match,flexible-extract": 0.2, "exact_match_stderr,flexible-extract": 0.02}, "piqa": {
        "acc,none": 0.5, "acc_stderr,none": 0.03}}})
    assert got == {"gsm8k": {"exact_match[strict-match]": 0.1, "exact_match[strict-match]_stderr": 0.01,
                             "exact_match[flexible-extract]": 0.2, "exact_match[flexible-extract]_stderr": 0.02},
                   "piqa": {"acc": 0.5, "acc_stderr": 0.03}}


def test_offline_tasks_score_the_word_with_its_leading_space():
    """lm-eval adds no target_delimiter to a loglikelihood request's continuation: the target must carry the
    word's leading space, or the model is scored on a word glued to the one before (acc 0 on pass keys a
    model finds every time). Checked on the requests lm-eval itself builds."""
    from simba_cli.eval.harness import task_dict

    wanted = {"simba_cloze": "target", "simba_passkey_exact": "answer", "simba_mqar": "answer",
              "simba_choice": None, "simba_passkey": None}
    loaded = {t.config.task: t for t in task_dict(list(wanted))["tasks"].values()}
    for name, field in wanted.items():
        task = loaded[name]
        doc = next(iter(task.test_docs()))
        requests = task.construct_requests(doc, task.doc_to_text(doc), metadata=(name, 0, 1))
        requests = requests if isinstance(requests, list) else [requests]
        continuations = [r.arguments[1] for r in requests]
        if field is not None:
            assert continuations == [" " + doc[field]], (name, continuations)
        else:  # multiple choice: lm-eval adds the task's delimiter to each choice
            assert all(c[:1] in (" ", "\n") and c[1:] in doc["choices"] for c in continuations), (name, continuations)
        assert not task.doc_to_text(doc).endswith(" ")


def test_recent_overlap_is_the_share_of_the_last_layers_tokens_that_are_the_most_recent():
    """Recent and dense keep only the most recent tokens (overlap 1); for Simba the share is counted from the
    trace of tokens entering the last layer, against the last k positions, by hand."""
    import torch

    from simba_cli.eval.perplexity import long_context_perplexity
    from simba_cli.simba.pruned import pruned_forward
    from simba_cli.simba.settings import DENSE, PruneConfig
    from tests.conftest import random_model, tiny_config

    model = random_model(tiny_config(n_layer=4), seed=4)
    stream = torch.randint(0, 64, (400,))
    args = dict(contexts=(64,), score_last=8, windows=4, batch_size=2)
    overlap = lambda cfg: long_context_perplexity(model, stream, cfg, **args)[0]["recent_overlap"]
    assert overlap(DENSE) == 1.0 and overlap(PruneConfig(final_keep=0.2, criterion="recent")) == 1.0
    simba = PruneConfig(final_keep=0.2, criterion="simba", mode="protect")
    ends = torch.linspace(64, 399, 4).long().tolist()
    shares = []
    for e in ends:
        ids = stream[e - 64:e][None]
        protected = torch.zeros_like(ids, dtype=torch.bool)
        protected[:, -8:] = True
        last = pruned_forward(model, ids, simba, protected=protected, trace=True).kept[-1][0].tolist()
        shares.append(sum(p >= 64 - len(last) for p in last) / len(last))
    assert overlap(simba) == pytest.approx(sum(shares) / 4)
    assert min(shares) < 1  # Simba keeps some older tokens here, so the check can tell


def test_long_context_perplexity_dense_equals_cross_entropy_by_hand(hf_dir):
    """The protocol's dense numbers against the plain forward: each window [e - L, e) scores its last K tokens'
    next tokens, stream[e - K + 1 .. e]; the windows' ends are the same for every context."""
    import torch.nn.functional as F

    from simba_cli.eval.perplexity import long_context_perplexity
    from simba_cli.models.checkpoint import load_checkpoint
    from simba_cli.simba.settings import DENSE

    model = load_checkpoint(hf_dir).eval()
    stream = torch.randint(0, model.cfg.vocab_size, (400,), generator=torch.Generator().manual_seed(0))
    contexts, k, windows = [32, 64], 8, 5
    rows = long_context_perplexity(model, stream, DENSE, contexts, k, windows, batch_size=2)
    ends = torch.linspace(64, stream.numel() - 1, windows).long().tolist()
    with torch.no_grad():
        for row, length in zip(rows, contexts):
            per_window = [F.cross_entropy(model(stream[None, e - length:e])[0, -k:], stream[e - k + 1:e + 1]).item()
                          for e in ends]
            assert row["window_nll"] == pytest.approx(per_window, abs=1e-5)
            assert row["ppl"] == pytest.approx(math.exp(sum(per_window) / windows), rel=1e-5)
