"""`simba compare`: dense Mamba against Simba-pruned Mamba at equal FLOPs, on the same tasks.

For every model of a ladder: the dense model, and at each final_keep of a sweep the Simba criterion
beside the baselines (`recent`, `random` by default: at tiny scale Simba mostly keeps recent tokens,
so `recent` must always be shown); where `flops-match` can reach the next smaller model's FLOPs, that
point too. Every number of FLOPs is measured from the evaluation itself. The difference to dense at
equal FLOPs is read off the dense models' FLOPs-accuracy curve, interpolated in log FLOPs (None
outside the curve: no extrapolation; a curve that is not monotone in FLOPs is flagged). Then
long-context perplexity against context length.

    setup(spec)            every model, task and setting resolved and checked; nothing written yet
    prepare_out(...)       --out claimed (new, --resume or --overwrite), compare.yaml written
    run(plan, out)         each finished evaluation saved under parts/ at once (an interrupted run resumes)
    finish(plan, out, ...) tables, paired differences, plots, summary.json

Rows are identified by their model, task and `PruneConfig` (its `key()`), never by their labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from simba_cli.errors import Interrupted, UserError
from simba_cli.eval.stats import pair_row, paired, pooled_z
from simba_cli.simba.settings import DENSE, PruneConfig

# The metric each task is read by (higher is better unless listed in LOWER_IS_BETTER). The cloze task is
# read by the mean log-likelihood per target token (lm-eval's per-word perplexity of a tiny model is a number
# near 1e9 that says little): derived from its samples.
MAIN_METRIC = {"simba_cloze": "loglik_per_token", "simba_choice": "acc_norm", "simba_recall": "acc",
               "simba_recall_long": "acc", "simba_passkey": "acc", "simba_passkey_exact": "acc", "simba_mqar": "acc",
               "lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc", "arc_easy": "acc",
               "arc_challenge": "acc_norm", "winogrande": "acc", "wikitext": "word_perplexity"}
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


@dataclass
class CompareSpec:
    """A comparison: the YAML recipe (recipes/compare.yaml) is its single source of truth."""

    models: list[str] = field(default_factory=list)  # empty: the zoo's Mamba-1 ladder, smallest first
    tasks: list[str] = field(default_factory=lambda: ["simba_passkey_exact", "simba_mqar", "simba_choice"])
    limit: int | None = 24
    schedule: str = "linear"
    final_keeps: list[float] = field(default_factory=lambda: [0.1])
    criteria: list[str] = field(default_factory=lambda: ["simba", "recent", "random"])
    subjects: list[str] = field(default_factory=list)  # criteria paired against every other (empty: the first)
    truncate: bool = True  # beside each pruned point, the dense model reading only the last tokens, same FLOPs
    match_flops: bool = True  # also prune each model to the next smaller model's FLOPs, where reachable
    match_seq_len: int = 1024
    ppl_contexts: list[int] = field(default_factory=lambda: [128, 512, 1024])
    ppl_score_last: int = 32
    ppl_windows: int = 8
    ppl_final_keep: float = 0.1
    ppl_criteria: list[str] = field(default_factory=lambda: ["simba", "recent"])
    batch_size: int = 16
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        from simba_cli.simba.criteria import check_criterion

        if not self.models:
            from simba_cli.models import zoo

            if not zoo.names("mamba"):
                raise UserError("no models to compare: the zoo is empty (train it with `make zoo`); give --models")
        if not self.tasks and not self.ppl_contexts:
            raise UserError("compare needs tasks or perplexity contexts")
        for name, values in (("models", self.models), ("tasks", self.tasks), ("criteria", self.criteria),
                             ("final_keeps", self.final_keeps), ("ppl_contexts", self.ppl_contexts)):
            twice = sorted({str(v) for v in values if values.count(v) > 1})
            if twice:  # each would be evaluated and paired twice, its comparisons counted twice in the pooled z
                raise UserError(f"{name} lists {', '.join(twice)} more than once; give each once")
        if not self.criteria:
            raise UserError("compare needs at least one criterion (the first is compared with the others)")
        for c in [*self.criteria, *self.ppl_criteria]:
            check_criterion(c)
        for c in self.subjects:
            if c not in self.criteria:
                raise UserError(f"subject {c!r} is not among the criteria; add it to criteria or drop it from subjects")
        for k in [*self.final_keeps, self.ppl_final_keep]:
            PruneConfig(schedule=self.schedule, final_keep=k)  # validates
        if self.limit is not None and self.limit < 2:
            raise UserError("limit must be at least 2 (standard errors need two documents)")
        if self.ppl_contexts:
            from simba_cli.eval.perplexity import check_ppl_args

            check_ppl_args(self.ppl_contexts, self.ppl_score_last, self.ppl_windows)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.match_flops and self.match_seq_len < 2:
            raise UserError(f"match_seq_len must be at least 2 tokens, got {self.match_seq_len}")

    @classmethod
    def from_yaml(cls, path: Path) -> CompareSpec:
        from simba_cli.typed import build, yaml_problem

        try:
            body = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"compare recipe {path} is not UTF-8 text; give a YAML file (see "
                            f"recipes/compare.yaml)") from None
        except yaml.YAMLError as e:
            raise UserError(f"compare recipe {path} is not valid YAML: {yaml_problem(e)}") from e
        except OSError as e:
            raise UserError(f"cannot read compare recipe {path} ({e.strerror})") from e
        if body is None:
            raise UserError(f"compare recipe {path} is empty; see recipes/compare.yaml for an example")
        return build(cls, body, f"compare recipe {path}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Setting:
    """One way of running a model: its prune settings; for a FLOPs-matched point, the model matched; for a
    baseline at the cost of a pruned setting (truncate), that setting's key (the two are paired)."""

    config: PruneConfig
    matched: str | None = None
    beside: tuple | None = None

    @property
    def label(self) -> str:
        return self.config.label() + (f" @{Path(self.matched).name}" if self.matched else "")


@dataclass
class Plan:
    """What `setup` resolved: the models, each one's settings, the tasks and the perplexity settings."""

    spec: CompareSpec
    models: list[str]
    settings: dict[str, list[Setting]]
    tasks: dict | None  # lm-eval's loaded task dict
    leaves: list[str]  # the tasks that run (a group such as mmlu runs as its member tasks)
    ppl_settings: dict[str, list[Setting]]
    fingerprints: dict[str, str]  # model -> `provenance.model_fingerprint` (its weights, for resuming)

    @property
    def n_jobs(self) -> int:
        n = sum(len(s) for s in self.settings.values()) * len(self.leaves)
        return n + sum(len(s) for s in self.ppl_settings.values()) * bool(self.spec.ppl_contexts)


def settings_for(spec: CompareSpec, model: str, smaller: str | None) -> list[Setting]:
    """Dense, the sweep for every criterion (and truncate at its cost), and the FLOPs-matched point."""
    from simba_cli.simba.flops_tables import match_final_keep, model_config

    n_layer = model_config(model)[0].n_layer
    subject = spec.criteria[0]

    def beside(config: PruneConfig) -> Setting:  # the dense model on the last tokens, at the same body cost
        share = round(config.mean_keep(n_layer), 6)
        return Setting(PruneConfig("truncate", share), None, dataclasses.replace(config, criterion=subject).key())

    out = [Setting(DENSE)]
    for k in spec.final_keeps:
        configs = [PruneConfig(spec.schedule, k, criterion=c, seed=spec.seed) for c in spec.criteria]
        out += [Setting(c) for c in configs] + ([beside(configs[0])] if spec.truncate else [])
    if spec.match_flops and smaller is not None:
        m = match_final_keep(model, smaller, spec.match_seq_len, PruneConfig(spec.schedule), head="last")
        if m.reachable and m.final_keep < 1:  # Simba and the recency baseline (random adds little here)
            configs = [PruneConfig(spec.schedule, round(m.final_keep, 6), criterion=c, seed=spec.seed)
                       for c in spec.criteria if c != "random"]
            out += [Setting(c, smaller) for c in configs]
            if spec.truncate:
                t = match_final_keep(model, smaller, spec.match_seq_len, PruneConfig("truncate"), head="last")
                out.append(Setting(PruneConfig("truncate", round(t.final_keep, 6)), smaller, configs[0].key()))
    return out


def setup(spec: CompareSpec) -> Plan:
    """Resolve and check everything (models, tasks, FLOPs matches) before anything is written."""
    from simba_cli.eval.harness import task_dict
    from simba_cli.models import zoo
    from simba_cli.simba.flops_tables import model_config

    models = spec.models or zoo.names("mamba")
    for name in models:
        model_config(name)  # a one-line error for a model that does not exist
    settings = {name: settings_for(spec, name, models[i - 1] if i else None) for i, name in enumerate(models)}
    tasks = task_dict(spec.tasks) if spec.tasks else None
    leaves = list(tasks["tasks"]) if tasks else []
    # perplexity: dense, each perplexity criterion at ppl_final_keep, and truncate beside the first
    ppl_spec = dataclasses.replace(spec, final_keeps=[spec.ppl_final_keep], criteria=spec.ppl_criteria,
                                   match_flops=False)
    ppl = {name: settings_for(ppl_spec, name, None) for name in models}
    if spec.ppl_contexts:
        check_ppl_text(models, spec)
    from simba_cli.provenance import model_fingerprint

    return Plan(spec, models, settings, tasks, leaves, ppl, {name: model_fingerprint(name) for name in models})


def check_ppl_text(models: list[str], spec: CompareSpec):
    """The evaluation text must hold the perplexity windows in every model's tokens: checked before the first
    evaluation, not after hours of them (models that share a vocabulary are tokenized once)."""
    from simba_cli.eval.perplexity import check_stream, token_stream
    from simba_cli.models import hub
    from simba_cli.models.tokenizer import load_tokenizer
    from simba_cli.simba.artifact import is_artifact, read_artifact

    checked = set()
    for name in models:
        tokenizer = load_tokenizer(hub.resolve(read_artifact(name)[0] if is_artifact(name) else name))
        vocab = tuple(sorted(tokenizer.get_vocab().items()))
        if vocab not in checked:
            check_stream(token_stream(tokenizer), spec.ppl_contexts, spec.ppl_windows, spec.ppl_score_last,
                         f"the evaluation text in {name}'s tokens")
            checked.add(vocab)


def prepare_out(out: Path, spec: CompareSpec, overwrite: bool = False, resume: bool = False) -> bool:
    """Claim `out` for this comparison; True when finished parts of an earlier run are reused."""
    from simba_cli.outdir import check_out, replace, write_atomic

    resuming = check_out(out, "compare.yaml", "compare", overwrite=overwrite, resume=resume)
    parts = sorted((out / "parts").glob("*.json")) if resuming else []
    if parts and CompareSpec.from_yaml(out / "compare.yaml") != spec:
        raise UserError(f"--resume with settings that differ from {out}/compare.yaml; resume with those, or "
                        f"pass --overwrite to start again")
    if not resuming:
        replace(out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    write_atomic(out / "compare.yaml", yaml.safe_dump(spec.to_dict(), sort_keys=False))
    return bool(parts)


def _part_path(out: Path, model: str, setting: Setting, task: str, fingerprint: str) -> Path:
    """parts/<model>__<label>__<task>__<hash of the whole setting>.json: readable, and unique per setting and
    per model weights (`fingerprint`: a retrained model's old parts are not reused)."""
    ident = json.dumps([model, setting.config.to_dict(), setting.matched, task, fingerprint])
    name = "__".join(x.replace("/", "_").replace(" ", "_").replace("@", "at-")
                     for x in (Path(model).name, setting.label, task))
    return out / "parts" / f"{name}__{hashlib.sha256(ident.encode()).hexdigest()[:8]}.json"


@dataclass
class Result:
    """One evaluation: its table row and its per-document (or per-window) values, higher is better."""

    model: str
    setting: Setting
    task: str
    row: dict
    per_doc: list[float]
    doc_info: list[dict] | None = None
    seconds: float = 0.0  # the time its evaluation took (of a perplexity part's rows, on the first)
    computed_by: dict | None = None  # the code that computed its part ({}: not recorded; None: counted elsewhere)


def run(plan: Plan, out: Path, progress: bool = True, dist=None, device=None) -> tuple[list[Result], list[Result]]:
    """Every evaluation of the plan, reusing finished parts: (task results, perplexity results).

    dist (a `distributed.Dist`) and device (this process's, from `distributed.setup`), under torchrun: every
    evaluation runs data parallel (each process scores its share of the batches; every process gets the whole
    result); rank 0 alone reads and writes the parts. Parts are evaluated one after another, each spread over
    every process, rather than whole parts dealt out to processes: the work is balanced however few the parts
    or however different their costs (a resumed run, a ladder whose largest model costs 20 times its
    smallest), one process alone touches --out, and a resumed run continues as a one-process run would."""
    import torch

    from simba_cli.distributed import Dist
    from simba_cli.eval.harness import only, run_tasks
    from simba_cli.eval.lm import SimbaLM
    from simba_cli.eval.perplexity import long_context_perplexity, token_stream
    from simba_cli.outdir import write_atomic
    from simba_cli.report.progress import Bar
    from simba_cli.simba.runner import ModelRunner

    spec = plan.spec
    dd = dist or Dist()
    torch.manual_seed(spec.seed)
    results, ppl_results = [], []

    def finished(path: Path):
        """A part saved by an earlier (interrupted) run, as rank 0 reads it; None when there is none."""
        return dd.from_main(json.loads(path.read_text()) if dd.main and path.is_file() else None)

    def save(path: Path, part):
        text = json.dumps(part) + "\n"
        if dd.main:
            write_atomic(path, text)
        return json.loads(text)  # as a resumed run reads it back

    from simba_cli.provenance import git_commit, versions

    made_by = {"git_commit": git_commit(), "versions": versions()}  # recorded in every part this run computes
    with Bar(progress and dd.main, plan.n_jobs, "compare", unit="eval") as bar:
        for name in plan.models:
            runner = ModelRunner.load(name, spec.device if device is None else device)
            lm = SimbaLM(runner=runner, batch_size=spec.batch_size)
            for setting in plan.settings[name]:
                for task in plan.leaves:
                    path = _part_path(out, name, setting, task, plan.fingerprints[name])
                    part = finished(path)
                    if part is None:
                        bar.describe(f"{Path(name).name} {setting.label} {task}")
                        runner.config = setting.config
                        began = time.time()
                        r = run_tasks(lm, only(plan.tasks, task), limit=spec.limit, log_samples=True)
                        part = save(path, {**_part(lm, name, setting, task, r), "seconds": time.time() - began,
                                           "computed_by": made_by})
                    results.append(Result(name, setting, task, part["row"], part["per_doc"], part.get("doc_info"),
                                          part.get("seconds", 0.0), part.get("computed_by", {})))
                    bar.advance()
            if spec.ppl_contexts:
                stream = token_stream(runner.tokenizer)
                for setting in plan.ppl_settings[name]:
                    path = _part_path(out, name, setting, "ppl", plan.fingerprints[name])
                    rows = finished(path)
                    if rows is None:
                        bar.describe(f"{Path(name).name} {setting.label} perplexity")
                        began = time.time()
                        rows = long_context_perplexity(runner.model, stream, setting.config, spec.ppl_contexts,
                                                       spec.ppl_score_last, spec.ppl_windows, spec.batch_size,
                                                       runner.device, dist=dd)
                        took = time.time() - began
                        rows = save(path, [{"model": name, "setting": setting.label, **r, "part_seconds": took,
                                            "computed_by": made_by} for r in rows])
                    for i, r in enumerate(rows):
                        ppl_results.append(Result(name, setting, f"ppl@{r['context']}", r,
                                                  [-x for x in r["window_nll"]],
                                                  seconds=r.get("part_seconds", 0.0) if i == 0 else 0.0,
                                                  computed_by=r.get("computed_by", {}) if i == 0 else None))
                    bar.advance()
            del lm, runner
    return results, ppl_results


def finish(plan: Plan, out: Path, results: list[Result], ppl_results: list[Result], started: float) -> dict:
    """Tables (CSV, Markdown, JSON), paired differences, plots and summary.json."""
    from simba_cli.eval.perplexity import table_rows
    from simba_cli.outdir import write_atomic
    from simba_cli.provenance import provenance
    from simba_cli.report.plots import plot_flops_accuracy, plot_passkey_heatmaps, plot_ppl_context
    from simba_cli.report.tables import write_tables

    spec = plan.spec
    rows = [r.row for r in results]
    ppl_rows = [r.row for r in ppl_results]
    at_equal_flops(rows)
    subjects = spec.subjects or [spec.criteria[0]]
    pairs, diffs = [], []
    for s in subjects:
        for rows_, diffs_ in (paired_rows(results, s), paired_rows(ppl_results, s)):
            pairs += rows_
            diffs += diffs_
    pooled = pooled_z(pairs, diffs, document_set)
    subject = " / ".join(subjects)
    write_tables(rows, out / "compare", notes=COMPARE_NOTES)
    if ppl_rows:
        write_tables(table_rows(ppl_rows), out / "perplexity", notes=PPL_NOTES)
    if pairs:
        write_tables(pairs, out / "paired", notes=PAIRED_NOTES.format(subject=subject))
        write_tables(pooled, out / "pooled", notes=POOLED_NOTES.format(subject=subject))
    figures = {}
    if rows:
        drawn = plot_flops_accuracy(rows, out / "flops_accuracy.png")
        figures["flops_accuracy"] = "flops_accuracy.png"
        if drawn["skipped"]:  # rows with no number to draw (a metric lm-eval did not report, say)
            figures["flops_accuracy_not_drawn"] = [list(x) for x in drawn["skipped"]]
    if ppl_rows:
        plot_ppl_context(ppl_rows, out / "ppl_context.png")
        figures["ppl_context"] = "ppl_context.png"
    cells = breakdown_rows(results)
    if cells:
        write_tables(cells, out / "breakdown", notes=BREAKDOWN_NOTES)
        for model in dict.fromkeys(r["model"] for r in cells):
            mine = [r for r in cells if r["model"] == model and r["task"].startswith("simba_passkey")]
            if mine:
                name = f"passkey_{Path(model).name}.png"
                plot_passkey_heatmaps(mine, out / name, title=f"{Path(model).name}: pass-key accuracy")
                figures[f"passkey_{Path(model).name}"] = name
    summary = {"spec": spec.to_dict(), "rows": rows, "perplexity": ppl_rows, "paired": pairs, "pooled": pooled,
               "breakdown": cells,
               "figures": figures, "elapsed_s": time.time() - started,
               # the whole comparison's evaluation time, summed over its parts (whichever run computed them)
               "compute_s": sum(r.seconds for r in results + ppl_results),
               # which code computed the parts: more than one where a resumed run spans code changes
               "parts_computed_by": computed_by(results + ppl_results),
               "provenance": provenance(seed=spec.seed, device=spec.device, model_fingerprints=plan.fingerprints)}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def run_compare(spec: CompareSpec, out: Path, overwrite: bool = False, resume: bool = False,
                progress: bool = True) -> dict:
    """setup, prepare_out, run, finish; returns the summary (also written to out/summary.json)."""
    from simba_cli import distributed
    from simba_cli.models.loading import resolve_device
    from simba_cli.outdir import check_out

    out = Path(out)
    started = time.time()
    check_out(out, "compare.yaml", "compare", overwrite=overwrite, resume=resume)  # at once, before the setup
    # under torchrun: this process's device and the process group; rank 0 alone writes --out
    dd, device = distributed.setup(resolve_device(spec.device))
    plan = setup(spec)
    dd.barrier()  # every process has checked --out before rank 0 claims it
    if dd.main:
        prepare_out(out, spec, overwrite, resume)
    try:
        results, ppl_results = run(plan, out, progress, dd, device)
    except KeyboardInterrupt:
        done = len(list((out / "parts").glob("*.json")))
        raise Interrupted(f"interrupted; {done} finished evaluations are kept in {out / 'parts'}: continue with "
                          f"the same command and --resume") from None
    summary = finish(plan, out, results, ppl_results, started) if dd.main else None
    return dd.from_main(summary)  # the same summary on every process


COMPARE_NOTES = """\
One row per model, setting and task. `setting`: dense, or `<criterion> <final_keep>` (linear schedule unless
named); `@<model>`: pruned to the measured FLOPs of that smaller dense model. `metric` names the column the
task is read by (higher is better, but perplexities; `loglik_per_token`: mean log-likelihood per target token,
nats).
`flops_per_doc` and `mean_keep` are measured from the forwards that ran. `dense_at_flops`: the dense models'
curve, interpolated in log FLOPs, at this row's FLOPs; `vs_dense`: the row's metric minus it, or it minus the
row's for a perplexity (positive: better than a dense model of the same cost). "-": outside the dense curve (no
extrapolation) or not measured. `dense_curve`: "not monotone" where a larger dense model scored worse than a
smaller one, which makes the interpolation a guide at best.
"""

BREAKDOWN_NOTES = """\
The long-range tasks per setting of their documents: pass keys by context `length` (tokens) and `depth`
of the key (0: the start of the passage, 1: just before the question); MQAR by `length` and `pairs` (K).
`docs`: documents in the cell (a run with --limit has few per cell).
"""

PPL_NOTES = """\
Perplexity of the last `ppl_score_last` tokens of each window (protected: never pruned), against the
context length; `flops_per_window` and `mean_keep` measured.
"""

PAIRED_NOTES = """\
`diff`: `subject` ({subject}) minus `vs` over the same documents (or perplexity windows), in the units of `per_doc`
(acc, acc_norm: 0/1 per document; loglik/token: nats per token; loglik/document: a perplexity task's summed
log-likelihood of the document, nats); positive means the subject is better.
`stderr`: the standard error of the paired mean; `z` = diff / stderr (where every document differs by the same
nonzero amount, the exact sign test's z); `beyond_2se` marks |z| > 2. `truncate` stands beside the first
criterion's settings, so only that subject is paired with it.
"""

POOLED_NOTES = """\
Every paired comparison of `subject` ({subject}) with `vs` (every model, keep and task) pooled; positive means
the subject is better. `z_documents`: within each set of documents (a task; the perplexity windows of every
context), each comparison's difference averaged per document and its paired z over the documents, then Stouffer's
over the `document_sets`, which share no documents: the figure to read. `z_comparisons`: Stouffer's over the
comparisons as if independent; they share documents (keeps, models, contexts), so it overstates |z|.
`better` / `worse`: how many comparisons point each way.
"""


def _part(lm, model: str, setting: Setting, task: str, r: dict) -> dict:
    """A finished evaluation: its row and the per-document values of its main metric."""
    metrics = dict(r["metrics"].get(task, {}))
    measured = r["measured"]
    n_docs = r["n_samples"][task]["effective"] if r.get("n_samples") else None
    metric = MAIN_METRIC.get(task, "acc")
    samples = (r.get("samples") or {}).get(task, [])
    if metric == "loglik_per_token":  # the sample's `perplexity` entry is its log-likelihood
        per_doc = [_scalar(s.get("perplexity")) / len(lm._encode_pair(*s["arguments"][0][:2])[1]) for s in samples]
        metrics["loglik_per_token"], metrics["loglik_per_token_stderr"] = _mean_se(per_doc)
    else:
        per_doc = [_scalar(s.get(metric)) for s in samples]
    config = setting.config
    criterion = "-" if config.dense else "truncate" if config.schedule == "truncate" else config.criterion
    row = {"model": model, "setting": setting.label, "criterion": criterion,
           "final_keep": 1.0 if config.dense else config.final_keep, "matched": setting.matched, "task": task,
           "docs": n_docs, **metrics, "flops_per_doc": measured["flops"] / max(1, n_docs or 1),
           "mean_keep": measured.get("mean_keep"), "keep_ratios": measured.get("keep_ratios")}
    # what each document tests (long-range tasks: length, depth, pairs), for the breakdowns and heat maps
    info = [{k: s["doc"][k] for k in BREAKDOWN if k in s.get("doc", {})} for s in samples]
    return {"row": row, "per_doc": per_doc, "doc_info": info if any(info) else None, "prune": config.to_dict()}


BREAKDOWN = ("length", "depth", "pairs")


def breakdown_rows(results: list[Result]) -> list[dict]:
    """The main metric of the long-range tasks per (length, depth) or (length, pairs): one row per model,
    setting, task and cell, with the number of documents."""
    rows = []
    for r in results:
        if not r.doc_info:
            continue
        cells: dict[tuple, list[float]] = {}
        for info, value in zip(r.doc_info, r.per_doc):
            key = tuple((k, info[k]) for k in BREAKDOWN if k in info and not (k == "depth" and "pairs" in info))
            cells.setdefault(key, []).append(value)
        for key, values in sorted(cells.items()):
            rows.append({"model": r.model, "setting": r.setting.label, "task": r.task, **dict(key),
                         r.row.get("metric", "acc"): float(np.mean(values)), "docs": len(values)})
    return rows


def _mean_se(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def _scalar(v) -> float:
    if isinstance(v, (list, tuple)):
        v = v[0]
    return float("nan") if v is None else float(v)


def dense_curve(rows: list[dict], task: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((r["flops_per_doc"], r[metric]) for r in rows
                 if r["task"] == task and r["setting"] == "dense" and r.get(metric) is not None)
    return np.log([p[0] for p in pts]), np.array([p[1] for p in pts], float)


def at_equal_flops(rows: list[dict]) -> None:
    """Add `vs_dense` (metric minus the dense curve at the same FLOPs), the curve's value there, and whether
    the curve is monotone in FLOPs (`dense_curve`), to each row."""
    for task in {r["task"] for r in rows}:
        metric = MAIN_METRIC.get(task, "acc")
        x, y = dense_curve(rows, task, metric)
        lower = metric in LOWER_IS_BETTER
        if lower:
            y = np.log(y)  # interpolate perplexity in log space
        steps = np.diff(-y if lower else y)
        shape = "monotone" if bool((steps >= 0).all()) else "not monotone"
        for r in rows:
            if r["task"] != task:
                continue
            r["metric"] = metric
            r["dense_curve"] = shape
            lx = math.log(r["flops_per_doc"])
            inside = len(x) >= 2 and x[0] - 1e-9 <= lx <= x[-1] + 1e-9
            if not inside or r.get(metric) is None:
                r["dense_at_flops"] = r["vs_dense"] = None
                continue
            v = float(np.interp(lx, x, y))
            v = math.exp(v) if lower else v
            r["dense_at_flops"] = v
            r["vs_dense"] = v - r[metric] if lower else r[metric] - v  # positive: better than dense, either way


def computed_by(results: list[Result]) -> list[dict]:
    """Each distinct code version (git commit, versions) that computed some of the parts, with how many: more than
    one where a resumed run spans a code change; parts saved before this record existed count as unknown."""
    counts: dict[str, int] = {}
    for r in results:
        if r.computed_by is not None:  # a perplexity part's rows share one record, on the first
            key = json.dumps(r.computed_by, sort_keys=True)
            counts[key] = counts.get(key, 0) + 1
    return [{**(json.loads(k) or {"git_commit": "unknown"}), "parts": n} for k, n in counts.items()]


def document_set(task: str) -> str:
    """Which documents a task's scores come from: the perplexity contexts score the same windows, and a task and
    its `_exact` variant read the same documents."""
    return "perplexity windows" if task.startswith("ppl@") else task.removesuffix("_exact")


def paired_rows(results: list[Result], subject: str = "simba") -> tuple[list[dict], list[list[float]]]:
    """`subject` (the first criterion of the recipe) minus every other criterion at the same model, task
    and schedule (the same PruneConfig but for the criterion), and minus dense: the mean difference per
    document (or window) with its standard error; and each row's per-document differences."""
    by_key = {(r.model, r.task, r.setting.config.key()): r for r in results}
    out, diffs = [], []
    for r in results:
        config = r.setting.config
        if config.dense or config.schedule == "truncate" or config.criterion != subject:
            continue  # (truncate settings carry the default criterion, which they never use)
        others = [o for o in results if o.model == r.model and o.task == r.task and o is not r
                  and not o.setting.config.dense
                  and (o.setting.beside == config.key() or o.setting.config.schedule != "truncate"
                       and dataclasses.replace(o.setting.config, criterion=subject).key() == config.key())]
        dense = by_key.get((r.model, r.task, DENSE.key()))
        for other in others + ([dense] if dense is not None else []):
            if not r.per_doc or len(r.per_doc) != len(other.per_doc):
                continue
            mean, se = paired(r.per_doc, other.per_doc)
            metric = r.row.get("metric")
            unit = "loglik/token" if r.task.startswith("ppl@") or metric == "loglik_per_token" else \
                "loglik/document" if metric in LOWER_IS_BETTER else metric  # a rolling task's sample: (loglik, n)
            oc = other.setting.config
            vs = "dense" if oc.dense else "truncate" if oc.schedule == "truncate" else oc.criterion
            out.append(pair_row(mean, se, len(r.per_doc), subject=subject, model=r.model, setting=r.setting.label,
                                task=r.task, per_doc=unit, vs=vs))
            diffs.append([a - b for a, b in zip(r.per_doc, other.per_doc)])
    return out, diffs
