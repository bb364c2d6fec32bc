"""`simba compare`: dense Mamba against Simba-pruned Mamba at equal FLOPs, on the same tasks.

For every model of a ladder: the dense model, and at each final_keep of a sweep the Simba criterion
beside the baselines (`recent`, `random` by default: at tiny scale Simba mostly keeps recent tokens,
so `recent` must always be shown); where `flops-match` can reach the next smaller model's FLOPs, that
point too. Every number of FLOPs is measured from the evaluation itself. The difference to dense at
equal FLOPs is read off the dense models' FLOPs-accuracy curve, interpolated in log FLOPs (None
outside the curve: no extrapolation). Then long-context perplexity against context length.

Each finished evaluation is saved under parts/ at once, so an interrupted compare resumes (--resume).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from simba_cli.errors import UserError
from simba_cli.eval.tasks import TASKS
from simba_cli.simba.settings import DENSE, PruneConfig

# The metric each task is read by (higher is better unless listed in LOWER_IS_BETTER).
MAIN_METRIC = {"simba_cloze": "perplexity", "simba_choice": "acc_norm", "simba_recall": "acc",
               "lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc", "arc_easy": "acc",
               "arc_challenge": "acc_norm", "winogrande": "acc"}
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


@dataclass
class CompareSpec:
    """A comparison: the YAML recipe (recipes/compare.yaml) is its single source of truth."""

    models: list[str] = field(default_factory=list)  # empty: every zoo model, smallest first
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    limit: int | None = 50
    schedule: str = "linear"
    final_keeps: list[float] = field(default_factory=lambda: [0.3, 0.1])
    criteria: list[str] = field(default_factory=lambda: ["simba", "recent", "random"])
    match_flops: bool = True  # also prune each model to the next smaller model's FLOPs, where reachable
    match_seq_len: int = 512
    ppl_contexts: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    ppl_score_last: int = 32
    ppl_windows: int = 16
    ppl_final_keep: float = 0.1
    ppl_criteria: list[str] = field(default_factory=lambda: ["simba", "recent"])
    batch_size: int = 16
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        from simba_cli.simba.criteria import check_criterion

        if not self.models:
            from simba_cli.models import zoo

            if not zoo.names():
                raise UserError("no models to compare: the zoo is empty (train it with `make zoo`); give --models")
        if not self.tasks and not self.ppl_contexts:
            raise UserError("compare needs tasks or perplexity contexts")
        if not self.criteria:
            raise UserError("compare needs at least one criterion (the first is compared with the others)")
        for c in [*self.criteria, *self.ppl_criteria]:
            check_criterion(c)
        for k in [*self.final_keeps, self.ppl_final_keep]:
            PruneConfig(schedule=self.schedule, final_keep=k)  # validates
        if self.limit is not None and self.limit < 2:
            raise UserError("limit must be at least 2 (standard errors need two documents)")
        if self.ppl_contexts:
            from simba_cli.eval.perplexity import check_ppl_args

            check_ppl_args(self.ppl_contexts, self.ppl_score_last, self.ppl_windows)
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}")

    @classmethod
    def from_yaml(cls, path: Path) -> CompareSpec:
        try:
            body = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read compare recipe {path} ({e})") from e
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(body) - known
        if unknown:
            raise UserError(f"compare recipe {path}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**body)


def settings_for(spec: CompareSpec, model: str, smaller: str | None) -> list[tuple[str, PruneConfig]]:
    """(label, config) for one model: dense, the sweep for every criterion, and the FLOPs-matched point."""
    out = [("dense", DENSE)]
    for k in spec.final_keeps:
        for c in spec.criteria:
            out.append((f"{c} {k:g}", PruneConfig(spec.schedule, k, criterion=c, seed=spec.seed)))
    if spec.match_flops and smaller is not None:
        from simba_cli.simba.flops_tables import match_final_keep

        m = match_final_keep(model, smaller, spec.match_seq_len, PruneConfig(spec.schedule), head="last")
        if m.reachable and m.final_keep < 1:  # Simba and the recency baseline (random adds little here)
            for c in [c for c in spec.criteria if c != "random"]:
                out.append((f"{c} @{smaller}", PruneConfig(spec.schedule, round(m.final_keep, 6), criterion=c,
                                                           seed=spec.seed)))
    return out


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same documents, and its standard error."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def dense_curve(rows: list[dict], task: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((r["flops_per_doc"], r[metric]) for r in rows
                 if r["task"] == task and r["setting"] == "dense" and r.get(metric) is not None)
    return np.log([p[0] for p in pts]), np.array([p[1] for p in pts], float)


def at_equal_flops(rows: list[dict]) -> None:
    """Add `vs_dense` (metric minus the dense curve at the same FLOPs) and the curve value to each row."""
    for task in {r["task"] for r in rows}:
        metric = MAIN_METRIC.get(task, "acc")
        x, y = dense_curve(rows, task, metric)
        if metric in LOWER_IS_BETTER:
            y = np.log(y)  # interpolate perplexity in log space
        for r in rows:
            if r["task"] != task:
                continue
            r["metric"] = metric
            lx = math.log(r["flops_per_doc"])
            inside = len(x) >= 2 and x[0] - 1e-9 <= lx <= x[-1] + 1e-9
            if not inside or r.get(metric) is None:
                r["dense_at_flops"] = r["vs_dense"] = None
                continue
            v = float(np.interp(lx, x, y))
            v = math.exp(v) if metric in LOWER_IS_BETTER else v
            r["dense_at_flops"] = v
            r["vs_dense"] = r[metric] - v


def _part_path(out: Path, *keys) -> Path:
    name = "__".join(str(k).replace("/", "_").replace(" ", "_").replace("@", "at-") for k in keys)
    return out / "parts" / f"{name}.json"


def run_compare(spec: CompareSpec, out: Path, overwrite: bool = False, resume: bool = False,
                progress: bool = True) -> dict:
    """Run the comparison into `out`; returns the summary (also written there)."""
    import torch

    from simba_cli.eval.harness import only, run_tasks, task_dict
    from simba_cli.eval.lm import SimbaLM
    from simba_cli.eval.perplexity import long_context_perplexity, table_rows, token_stream
    from simba_cli.outdir import write_atomic
    from simba_cli.provenance import provenance
    from simba_cli.report.plots import plot_flops_accuracy, plot_ppl_context
    from simba_cli.report.tables import write_tables
    from simba_cli.simba.artifact import load_any

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise UserError(f"{out} exists and is not empty; pass --overwrite to replace it or --resume to continue")
    if overwrite and out.exists() and not resume and any(out.iterdir()):
        import shutil

        if not (out / "compare.yaml").is_file():  # --overwrite replaces a compare run, nothing else
            raise UserError(f"{out} holds files that no compare wrote (no compare.yaml); choose another --out")
        shutil.rmtree(out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    if resume and (out / "compare.yaml").is_file():
        saved = CompareSpec.from_yaml(out / "compare.yaml")
        if saved != spec:
            raise UserError(f"--resume with settings that differ from {out}/compare.yaml; resume with those")
    write_atomic(out / "compare.yaml", yaml.safe_dump(dataclasses.asdict(spec), sort_keys=False))
    torch.manual_seed(spec.seed)
    from simba_cli.models.loading import resolve_device

    device = str(resolve_device(spec.device))

    from simba_cli.models import zoo

    models = spec.models or zoo.names()
    plan = []
    for i, name in enumerate(models):
        smaller = models[i - 1] if i > 0 else None
        plan.append((name, settings_for(spec, name, smaller)))
    tasks = task_dict(spec.tasks) if spec.tasks else None
    leaves = list(tasks["tasks"]) if tasks else []  # a group (e.g. mmlu) runs as its member tasks
    n_jobs = (sum(len(s) for _, s in plan) * len(leaves)
              + len(models) * (1 + len(spec.ppl_criteria)) * bool(spec.ppl_contexts))
    started = time.time()
    rows, ppl_rows, samples = [], [], {}
    from simba_cli.report.progress import Bar

    with Bar(progress, n_jobs, "compare") as bar:
        for name, settings in plan:
            loaded, _ = load_any(name, device=device)
            lm = SimbaLM(model=loaded, batch_size=spec.batch_size, device=device)
            for label, config in settings:
                for task in leaves:
                    path = _part_path(out, name, label, task)
                    if path.is_file():
                        part = json.loads(path.read_text())
                    else:
                        bar.describe(f"{name} {label} {task}")
                        lm.config = config
                        r = run_tasks(lm, only(tasks, task), limit=spec.limit, log_samples=True)
                        part = _part(name, label, config, task, r)
                        write_atomic(path, json.dumps(part) + "\n")
                    rows.append(part["row"])
                    samples[(name, label, task)] = part["per_doc"]
                    bar.advance()
            if spec.ppl_contexts:
                stream = token_stream(loaded.tokenizer)
                for label, config in [("dense", DENSE)] + [
                        (f"{c} {spec.ppl_final_keep:g}", PruneConfig(spec.schedule, spec.ppl_final_keep, criterion=c,
                                                                    seed=spec.seed))
                        for c in spec.ppl_criteria]:
                    path = _part_path(out, name, label, "ppl")
                    if path.is_file():
                        part_rows = json.loads(path.read_text())
                    else:
                        bar.describe(f"{name} {label} perplexity")
                        part_rows = [{"model": name, "setting": label, **r} for r in long_context_perplexity(
                            loaded.model, stream, config, spec.ppl_contexts, spec.ppl_score_last, spec.ppl_windows,
                            spec.batch_size, device)]
                        write_atomic(path, json.dumps(part_rows) + "\n")
                    ppl_rows += part_rows
                    bar.advance()
            del lm, loaded

    at_equal_flops(rows)
    pairs = paired_rows(rows, samples, spec.criteria[0]) + paired_ppl_rows(ppl_rows, spec.criteria[0])
    write_tables(rows, out / "compare")
    if ppl_rows:
        write_tables(table_rows(ppl_rows), out / "perplexity")
    pooled = pooled_z(pairs)
    if pairs:
        write_tables(pairs, out / "paired")
        write_tables(pooled, out / "pooled")
    figures = {}
    if rows:
        plot_flops_accuracy(rows, out / "flops_accuracy.png")
        figures["flops_accuracy"] = "flops_accuracy.png"
    if ppl_rows:
        plot_ppl_context(ppl_rows, out / "ppl_context.png")
        figures["ppl_context"] = "ppl_context.png"
    summary = {"spec": dataclasses.asdict(spec), "rows": rows, "perplexity": ppl_rows, "paired": pairs,
               "pooled": pooled,
               "figures": figures, "elapsed_s": time.time() - started,
               "provenance": provenance(seed=spec.seed, device=str(device))}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _part(model: str, label: str, config: PruneConfig, task: str, r: dict) -> dict:
    metrics = r["metrics"].get(task, {})
    measured = r["measured"]
    n_docs = r["n_samples"][task]["effective"] if r.get("n_samples") else None
    metric = MAIN_METRIC.get(task, "acc")
    # Per document: the metric (acc, acc_norm) or, for perplexity, the log-likelihood lm-eval keeps under it.
    per_doc = [_scalar(s.get(metric)) for s in (r.get("samples") or {}).get(task, [])]
    row = {"model": model, "setting": label, "criterion": config.criterion if config.schedule != "none" else "-",
           "final_keep": config.final_keep if config.schedule != "none" else 1.0, "task": task,
           "docs": n_docs, **metrics,
           "flops_per_doc": measured["flops"] / max(1, n_docs or 1),
           "mean_keep": measured.get("mean_keep"), "keep_ratios": measured.get("keep_ratios")}
    return {"row": row, "per_doc": per_doc}


def _scalar(v) -> float:
    if isinstance(v, (list, tuple)):
        v = v[0]
    return float("nan") if v is None else float(v)


def paired_rows(rows: list[dict], samples: dict, subject: str = "simba") -> list[dict]:
    """`subject` (the first criterion of the recipe) minus every other criterion and dense, at the same
    model, keep and task: the mean difference per document with its standard error."""
    out = []
    others = sorted({r["criterion"] for r in rows} - {subject, "-"}) + ["dense"]
    for r in rows:
        if r["criterion"] != subject:
            continue
        mine = samples.get((r["model"], r["setting"], r["task"]))
        for other in others:
            label = "dense" if other == "dense" else other + r["setting"][len(subject):]
            theirs = samples.get((r["model"], label, r["task"]))
            if not mine or not theirs or len(mine) != len(theirs):
                continue
            mean, se = paired(mine, theirs)
            out.append({"model": r["model"], "setting": r["setting"], "task": r["task"],
                        "per_doc": "loglik" if r.get("metric") in LOWER_IS_BETTER else r.get("metric"),
                        "vs": other, "diff": mean, "stderr": se, "docs": len(mine)})
    return out


def paired_ppl_rows(ppl_rows: list[dict], subject: str = "simba") -> list[dict]:
    """`subject` minus every other perplexity setting of the same model and context, paired over windows,
    as log-likelihood per scored token (higher is better, like the tasks' per-document log-likelihoods)."""
    by_key = {(r["model"], r["setting"], r["context"]): r for r in ppl_rows}
    out = []
    for (model, setting, context), r in by_key.items():
        if setting.split()[0] != subject:
            continue
        keep = setting[len(subject):]
        for (m2, other, c2), r2 in by_key.items():
            if (m2, c2) != (model, context) or other == setting or not (other == "dense" or other.endswith(keep)):
                continue
            mean, se = paired([-x for x in r["window_nll"]], [-x for x in r2["window_nll"]])
            out.append({"model": model, "setting": setting, "task": f"ppl@{context}", "per_doc": "loglik/token",
                        "vs": other.split()[0], "diff": mean, "stderr": se, "docs": len(r["window_nll"])})
    return out


def pooled_z(pairs: list[dict]) -> list[dict]:
    """One line per baseline: the paired differences against it (every model, keep and task, in their own
    units) pooled as Stouffer's z = sum(diff / stderr) / sqrt(n); positive means the subject is better.
    A comparison whose documents all agree (stderr 0) counts as z = 0."""
    out = []
    for vs in dict.fromkeys(p["vs"] for p in pairs):
        zs = [p["diff"] / p["stderr"] if p["stderr"] > 0 else 0.0 for p in pairs if p["vs"] == vs]
        out.append({"vs": vs, "comparisons": len(zs), "z": sum(zs) / math.sqrt(len(zs)),
                    "better": sum(z > 0 for z in zs), "worse": sum(z < 0 for z in zs)})
    return out
