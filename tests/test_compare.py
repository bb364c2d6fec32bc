"""compare: the dense curve interpolation, paired differences, the default recipe, a tiny end-to-end run."""

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
from typer.testing import CliRunner

from simba_cli.cli import app
from simba_cli.eval.compare import CompareSpec, at_equal_flops, document_set
from simba_cli.eval.stats import pair_row, paired, pooled_z

ROOT = Path(__file__).resolve().parent.parent


def test_default_recipe_file_equals_the_built_in_defaults():
    assert CompareSpec.from_yaml(ROOT / "recipes" / "compare.yaml") == CompareSpec()


def test_the_criterion_ablation_recipe_is_valid_and_pairs_against_simba():
    spec = CompareSpec.from_yaml(ROOT / "recipes" / "criteria.yaml")
    from simba_cli.simba.criteria import CRITERIA

    # every criterion the toolkit has, on the tasks and on perplexity, paired against the signed default
    assert spec.criteria[0] == "simba" and set(spec.criteria) == set(CRITERIA) == set(spec.ppl_criteria)


def test_pooled_z_over_comparisons_is_stouffers():
    pairs = [{"vs": "recent", "z": 2.0}, {"vs": "recent", "z": -1.0}, {"vs": "recent", "z": 0.0},
             {"vs": "dense", "z": -3.0}]
    recent, dense = pooled_z(pairs)
    assert recent == {"vs": "recent", "comparisons": 3, "z_comparisons": pytest.approx((2 - 1 + 0) / math.sqrt(3)),
                      "better": 1, "worse": 1}
    assert dense["z_comparisons"] == pytest.approx(-3.0) and dense["worse"] == 1


def test_pooled_z_over_documents_counts_shared_documents_once():
    """Three comparisons on the same 40 documents with the same differences are one piece of evidence: Stouffer's
    over comparisons gives sqrt(3) times their z, the document-level z gives their z. A second task, on other
    documents, adds to it as Stouffer's over independent sets."""
    rng = np.random.default_rng(0)
    d = list(rng.normal(0.1, 1.0, 40))
    e = list(rng.normal(-0.05, 1.0, 30))
    one = pair_row(*paired(d, [0.0] * 40), 40, vs="recent", task="t")
    other = pair_row(*paired(e, [0.0] * 30), 30, vs="recent", task="u")
    pairs = [dict(one, task="t"), dict(one, task="t_exact"), dict(one, task="t"), other]
    (row,) = pooled_z(pairs, [d, d, d, e], document_set)
    assert row["z_comparisons"] == pytest.approx((3 * one["z"] + other["z"]) / 2)
    assert row["document_sets"] == 2
    assert row["z_documents"] == pytest.approx((one["z"] + other["z"]) / math.sqrt(2))
    (ppl,) = pooled_z([dict(one, task="ppl@128"), dict(one, task="ppl@1024")], [d, d], document_set)
    assert ppl["document_sets"] == 1 and ppl["z_documents"] == pytest.approx(one["z"])


def test_a_difference_the_same_on_every_document_is_not_z_0():
    """Every one of 24 documents one way (se 0) is the strongest paired evidence there is: the exact sign test's z
    (one-sided p = 2^-24, z about 5.3), marked; no difference at all stays 0."""
    row = pair_row(*paired([1.0] * 24, [0.0] * 24), 24)
    assert row["stderr"] == 0 and row["z"] == pytest.approx(-NormalDist().inv_cdf(0.5 ** 24))
    assert row["z"] > 5 and row["beyond_2se"] == "better"
    assert pair_row(*paired([0.0] * 24, [1.0] * 24), 24)["beyond_2se"] == "worse"
    assert pair_row(*paired([1.0] * 24, [1.0] * 24), 24)["z"] == 0.0


def test_difference_to_dense_is_read_off_the_dense_curve_in_log_flops():
    rows = [
        {"task": "t", "setting": "dense", "model": "a", "flops_per_doc": 100.0, "acc": 0.30},
        {"task": "t", "setting": "dense", "model": "b", "flops_per_doc": 400.0, "acc": 0.50},
        {"task": "t", "setting": "simba 0.1", "model": "b", "flops_per_doc": 200.0, "acc": 0.45},
        {"task": "t", "setting": "simba 0.1", "model": "b", "flops_per_doc": 50.0, "acc": 0.2},
    ]
    at_equal_flops(rows)
    # 200 is halfway between 100 and 400 in log FLOPs: the dense curve is at 0.40 there
    assert rows[2]["dense_at_flops"] == pytest.approx(0.40)
    assert rows[2]["vs_dense"] == pytest.approx(0.05)
    assert rows[3]["vs_dense"] is None  # outside the dense curve: no extrapolation


def test_perplexity_is_interpolated_in_log_space():
    rows = [{"task": "wikitext", "setting": "dense", "model": m, "flops_per_doc": f, "word_perplexity": p}
            for m, f, p in (("a", 100.0, 100.0), ("b", 400.0, 25.0))]
    rows.append({"task": "wikitext", "setting": "x", "model": "b", "flops_per_doc": 200.0, "word_perplexity": 40.0})
    at_equal_flops(rows)
    assert rows[2]["dense_at_flops"] == pytest.approx(50.0)  # geometric mean of 100 and 25
    assert rows[2]["dense_curve"] == "monotone"  # perplexity falls with FLOPs: the curve is right
    assert rows[2]["vs_dense"] == pytest.approx(10.0)  # 40 against the curve's 50: better, so positive


def test_a_dense_curve_that_is_not_monotone_in_flops_is_flagged():
    rows = [{"task": "t", "setting": "dense", "model": m, "flops_per_doc": f, "acc": a}
            for m, f, a in (("a", 100.0, 0.5), ("b", 200.0, 0.4), ("c", 400.0, 0.6))]
    at_equal_flops(rows)
    assert {r["dense_curve"] for r in rows} == {"not monotone"}
    rows[1]["acc"] = 0.55
    at_equal_flops(rows)
    assert {r["dense_curve"] for r in rows} == {"monotone"}


def test_paired_difference_and_standard_error():
    mean, se = paired([1, 0, 1, 1], [0, 0, 1, 0])
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(math.sqrt(1 / 3) / 2)  # sd of (1, 0, 0, 1) is sqrt(1/3), over sqrt(4)


def test_tiny_compare_end_to_end_resumes_and_refuses_to_overwrite(tmp_path):
    from simba_cli.data.bpe import train_bpe
    from simba_cli.models.checkpoint import save_checkpoint
    from tests.conftest import random_model, tiny_config
    from tests.test_eval import TEXT  # noqa: F401  (the same tiny world)

    tok = train_bpe(TEXT, 300)
    small = save_checkpoint(random_model(tiny_config(vocab_size=304, n_layer=3), 1), tmp_path / "s", tokenizer=tok)
    big = save_checkpoint(random_model(tiny_config(vocab_size=304, n_layer=4), 2), tmp_path / "b", tokenizer=tok)
    recipe = tmp_path / "c.yaml"
    recipe.write_text(f"""models: [{small}, {big}]
tasks: [simba_choice, simba_passkey_exact]
limit: 3
final_keeps: [0.5]
criteria: [simba, recent]
subjects: [simba, recent]
match_flops: true
match_seq_len: 64
ppl_contexts: [48, 64]
ppl_score_last: 16
ppl_windows: 2
""")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["compare", "--recipe", str(recipe), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    settings = {(row["model"], row["setting"]) for row in summary["rows"]}
    assert (str(small), "dense") in settings and (str(big), "simba 0.5") in settings
    assert (str(big), "recent 0.5") in settings
    assert all(row["flops_per_doc"] > 0 for row in summary["rows"])
    assert {p["vs"] for p in summary["paired"]} >= {"recent", "dense", "truncate"}
    # a subject's rows are its own settings': truncate (which carries the default criterion) is never one
    assert all(not p["setting"].startswith("truncate") for p in summary["paired"])
    # truncate stands beside Simba at the same body cost: the last 55% of the input (linear to 0.5 over 4
    # layers keeps 1, 0.83, 0.67, 0.5 of it: mean 0.75 for the big model)
    row = {(r["model"], r["setting"], r["task"]): r for r in summary["rows"]}
    simba, cut = row[(str(big), "simba 0.5", "simba_choice")], row[(str(big), "truncate 0.75", "simba_choice")]
    assert cut["mean_keep"] == pytest.approx(simba["mean_keep"], abs=0.03)
    # at the body cost of the recency baseline, which keeps as many tokens and computes no criterion either
    recent = row[(str(big), "recent 0.5", "simba_choice")]
    assert cut["flops_per_doc"] == pytest.approx(recent["flops_per_doc"], rel=2e-3)
    assert cut["flops_per_doc"] < simba["flops_per_doc"]
    # the big model pruned to the small one's FLOPs (final_keep 0.34 at 64 tokens): measured on the task's
    # documents, Simba and truncate cost what the small model costs dense (within 2%), recent less
    small_dense = row[(str(small), "dense", "simba_choice")]["flops_per_doc"]
    matched = {r["criterion"]: r for r in summary["rows"] if r["matched"] == str(small) and r["task"] == "simba_choice"}
    assert matched.keys() == {"simba", "recent", "truncate"} and all(r["model"] == str(big) for r in matched.values())
    for criterion in ("simba", "truncate"):
        assert matched[criterion]["flops_per_doc"] / small_dense == pytest.approx(1, abs=0.02), criterion
    assert matched["recent"]["flops_per_doc"] < matched["simba"]["flops_per_doc"]
    # the pass key by length and depth: each setting's cells hold its documents, and average to its accuracy
    cells = json.loads((out / "breakdown.json").read_text())
    assert cells == summary["breakdown"] and {c["task"] for c in cells} == {"simba_passkey_exact"}
    for result in summary["rows"]:
        if result["task"] == "simba_passkey_exact":
            mine = [c for c in cells if (c["model"], c["setting"]) == (result["model"], result["setting"])]
            assert mine and all({"length", "depth"} <= c.keys() for c in mine)
            assert sum(c["docs"] for c in mine) == result["docs"] == 3
            assert sum(c["acc"] * c["docs"] for c in mine) / 3 == pytest.approx(result["acc"])
    # every criterion of the run is drawn
    from simba_cli.report.plots import plot_flops_accuracy

    drawn = plot_flops_accuracy(summary["rows"], tmp_path / "again.png")
    criteria = {r["criterion"] for r in summary["rows"]} - {"-"}
    assert set(drawn["criteria"]) == criteria == {"simba", "recent", "truncate"}
    pooled_keys = [(p["subject"], p["vs"]) for p in summary["pooled"]]
    assert pooled_keys == list(dict.fromkeys((p["subject"], p["vs"]) for p in summary["paired"]))
    # each subject is paired against the other: the same documents, opposite signs
    diffs = lambda pair: {(p["model"], p["task"]): p["diff"] for p in summary["paired"]
                          if (p["subject"], p["vs"]) == pair}
    a, b = diffs(("simba", "recent")), diffs(("recent", "simba"))
    assert a and a.keys() == b.keys() and all(a[k] == pytest.approx(-b[k]) for k in a)
    # perplexity, paired over windows: the windows' mean NLLs average to the row's NLL, and the paired
    # difference is the mean of the per-window differences
    ppl = {(r["model"], r["setting"], r["context"]): r for r in summary["perplexity"]}
    for row in ppl.values():
        assert sum(row["window_nll"]) / len(row["window_nll"]) == pytest.approx(row["nll"], rel=1e-6)
    pair = next(p for p in summary["paired"] if p["task"] == "ppl@64" and p["vs"] == "dense" and p["model"] == str(big))
    mine, dense = ppl[(str(big), pair["setting"], 64)], ppl[(str(big), "dense", 64)]
    expect = sum(d - m for m, d in zip(mine["window_nll"], dense["window_nll"])) / len(dense["window_nll"])
    assert pair["diff"] == pytest.approx(expect, rel=1e-9, abs=1e-12)
    # the per-window lists stay in the JSON; the printed and written tables keep one number per cell
    assert "window_nll" not in r.output and "window_nll" not in (out / "perplexity.csv").read_text()
    for name in ("compare.csv", "compare.md", "compare.json", "perplexity.csv", "flops_accuracy.png",
                 "ppl_context.png", "compare.yaml"):
        assert (out / name).is_file(), name
    assert summary["provenance"]["git_commit"] is None or len(summary["provenance"]["git_commit"]) >= 40
    # the results are never overwritten without --overwrite; --resume reuses every finished part
    again = CliRunner().invoke(app, ["compare", "--recipe", str(recipe), "--out", str(out), "--quiet"])
    assert again.exit_code == 2 and "--overwrite" in again.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's own file")
    other = CliRunner().invoke(app, ["compare", "--recipe", str(recipe), "--out", str(tmp_path / "mine"),
                                     "--overwrite", "--quiet"])
    assert other.exit_code == 2 and "no `simba compare` wrote" in other.output
    assert (tmp_path / "mine" / "notes.txt").exists()
    parts = sorted(p.stat().st_mtime_ns for p in (out / "parts").iterdir())
    resumed = CliRunner().invoke(app, ["compare", "--recipe", str(recipe), "--out", str(out), "--resume", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.stat().st_mtime_ns for p in (out / "parts").iterdir()) == parts
    # the comparison's evaluation time is its parts', whichever run computed them
    assert json.loads((out / "summary.json").read_text())["compute_s"] == pytest.approx(summary["compute_s"])
    assert summary["compute_s"] > 0
    # every part says which code computed it; a resumed run over parts of other code says so
    (made,) = summary["parts_computed_by"]
    assert made["parts"] == len(list((out / "parts").iterdir())) and "versions" in made
    for part in (out / "parts").iterdir():
        if "simba_choice" in part.name:
            body = json.loads(part.read_text())
            part.write_text(json.dumps({**body, "computed_by": {"git_commit": "an-older-commit"}}))
            break
    mixed = CliRunner().invoke(app, ["compare", "--recipe", str(recipe), "--out", str(out), "--resume", "--quiet"])
    assert "computed by 2 versions of the code" in mixed.output
    assert {c["git_commit"] for c in json.loads((out / "summary.json").read_text())["parts_computed_by"]} == \
        {made["git_commit"], "an-older-commit"}
    # other weights under the same name (a retrained model): its parts are computed again, the other's reused
    save_checkpoint(random_model(tiny_config(vocab_size=304, n_layer=4, d_model=48), 5), big, tokenizer=tok,
                    overwrite=True)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    again = CliRunner().invoke(app, ["compare", "--recipe", str(recipe), "--out", str(out), "--resume", "--quiet"])
    assert again.exit_code == 0, again.output
    after = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    new = set(after) - set(before)
    assert new and all(n.startswith("b__") for n in new)
    assert all(after[n] == t for n, t in before.items())
    assert json.loads((out / "summary.json").read_text())["perplexity"] != summary["perplexity"]
