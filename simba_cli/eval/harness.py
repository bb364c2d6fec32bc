"""Running lm-eval tasks through the `simba` model: the offline tasks by default, lm-eval's own by name.

Results keep lm-eval's metric names (acc, acc_norm, perplexity, ...) with their standard errors, and
add what really ran: FLOPs per request and the tokens entering each layer.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

from simba_cli.errors import UserError
from simba_cli.eval.tasks import ALL_TASKS as TASKS
from simba_cli.eval.tasks import build_tasks


def task_dict(tasks: list[str], source: str = "shakespeare"):
    """lm-eval task objects for names: the offline tasks (built on first use) and lm-eval's built-ins.

    lm-eval's own tasks load their data through `datasets`: from the hub, or from its local cache. When
    the hub does not answer (checked in about 2 s), they load in offline mode, so that a task missing from
    the cache is a one-line error at once instead of half a minute of retries."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    offline = [t for t in tasks if t in TASKS]
    others = [t for t in tasks if t not in TASKS]
    managers = []
    if offline:
        managers.append((TaskManager(include_path=str(build_tasks(source)), include_defaults=False), offline))
    if others:
        tm = TaskManager()
        unknown = [t for t in others if t not in tm.all_tasks]
        if unknown:
            raise UserError(f"unknown task(s) {', '.join(unknown)}; offline tasks: {', '.join(TASKS)}; or any "
                            f"lm-eval task (e.g. piqa, hellaswag, lambada_openai, arc_easy; list them with "
                            f"`python -m simba_cli.lm_eval ls tasks`)")
        managers.append((tm, others))
    loaded = {"tasks": {}, "groups": {}, "group_map": {}}
    for tm, names in managers:
        hub = names is others
        why = None if not hub or _offline_mode() or hub_reachable() else "the Hugging Face hub does not answer"
        try:
            with _hub_offline() if why else contextlib.nullcontext():
                part = tm.load(names)
            for key in loaded:
                loaded[key].update(part[key])
        except Exception as e:  # datasets' hub errors when offline are many different classes
            if not hub:
                raise
            if why:
                raise UserError(f"cannot load lm-eval task(s) {', '.join(names)}: {why} and they are not in its "
                                f"local cache ({type(e).__name__}); run them once with network to cache them; "
                                f"the offline tasks are {', '.join(TASKS)}") from e
            raise UserError(f"cannot load lm-eval task(s) {', '.join(names)} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]}); they need the Hugging Face hub or its local "
                            f"cache; the offline tasks are {', '.join(TASKS)}") from e
    return loaded


_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _offline_mode() -> bool:
    """Whether the user asked for the hub's offline mode (the values huggingface_hub takes as true)."""
    import os

    names = (*_OFFLINE_VARIABLES, "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(n, "").strip().upper() in ("1", "ON", "YES", "TRUE") for n in names)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub (or the proxy to it) accepts a connection within `timeout` seconds;
    False in offline mode."""
    import socket
    import threading
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if _offline_mode() or constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    answered = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            answered.append(True)
        except (OSError, ValueError):
            pass

    # in a thread: resolving the name has no timeout of its own
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answered)


@contextlib.contextmanager
def _hub_offline():
    """The hub's offline mode for `datasets` and huggingface_hub, which read it when they are imported."""
    import os

    import datasets.config
    import huggingface_hub.constants

    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved_flags = [getattr(module, name) for module, name in flags]
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_VARIABLES}
    try:
        for module, name in flags:
            setattr(module, name, True)
        os.environ.update(dict.fromkeys(_OFFLINE_VARIABLES, "1"))
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags):
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def only(tasks: dict, name: str) -> dict:
    """The task dict of one task out of a loaded one (each task is evaluated alone: its own FLOPs)."""
    return {"tasks": {name: tasks["tasks"][name]}, "groups": {}, "group_map": {}}


def flat_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value, metric_stderr: value}} from lm-eval's results. The default filter's name
    (',none') is dropped; any other stays, so that e.g. exact_match,strict-match and
    exact_match,flexible-extract become exact_match[strict-match] and exact_match[flexible-extract]."""
    out = {}
    for task, values in results["results"].items():
        row = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            name, filt = key.split(",", 1)
            if filt != "none":
                base, stderr, _ = name.partition("_stderr")
                name = f"{base}[{filt}]" + (stderr if stderr else "")
            if isinstance(value, float) and math.isnan(value):
                value = None
            row[name] = value
        out[task] = row
    return out


FEWSHOT_SEED = 1234  # lm-eval's default


def _seed_tasks(loaded: dict, num_fewshot: int | None):
    for task in loaded["tasks"].values():
        # the same few-shot examples in every run and every setting (paired differences need them), and
        # lm-eval's rule: a task whose config fixes 0 shots keeps it
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)


def count_requests(loaded: dict, limit: int | None = None, num_fewshot: int | None = None) -> dict[str, int]:
    """Requests per task (what a progress bar counts), by building them as lm-eval's evaluate will."""
    import contextlib
    import io

    _seed_tasks(loaded, num_fewshot)
    counts = {}
    for name, task in loaded["tasks"].items():
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's tqdm bar over the documents
                task.build_all_requests(limit=limit)
        except ValueError as e:  # random.sample: more shots than the task's few-shot pool holds
            if "sample larger than population" not in str(e).lower():
                raise
            raise UserError(f"--num-fewshot {num_fewshot} asks for more examples than {name}'s few-shot pool "
                            f"holds; use fewer") from None
        counts[name] = len(task.instances)
    return counts


def run_tasks(lm, tasks, limit: int | None = None, num_fewshot: int | None = None, log_samples: bool = False,
              bootstrap_iters: int = 1000) -> dict:
    """Evaluate `lm` (a SimbaLM) on `tasks` (a list of names, or task objects from `task_dict`)."""
    import contextlib
    import io
    import os
    import random

    import numpy as np
    from lm_eval.evaluator import evaluate

    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-request bars; callers show their own progress
    loaded = task_dict(tasks) if isinstance(tasks, list) else tasks
    _seed_tasks(loaded, num_fewshot)
    random.seed(0)  # as lm-eval's simple_evaluate
    np.random.seed(FEWSHOT_SEED)
    before, forwards = lm.runner.flops, lm.runner.forwards
    with contextlib.redirect_stdout(io.StringIO()):  # lm-eval prints "bootstrapping for stddev: ..." lines
        results = evaluate(lm, loaded, limit=limit, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
                           verbosity="WARNING")
    after = lm.runner.flops
    ran = after if before is None else after - before
    measured = {"forwards": 0} if ran is None else {"forwards": lm.runner.forwards - forwards, **ran.summary()}
    return {"metrics": flat_metrics(results), "measured": measured,
            "samples": results.get("samples") if log_samples else None, "n_samples": results.get("n-samples")}


def evaluate_model(model: str, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
                   batch_size: int = 16, device: str | None = None, prune: dict | None = None,
                   ppl_contexts: list[int] | None = None, ppl_score_last: int = 64, ppl_windows: int = 16,
                   ppl_data: str = "shakespeare", progress: bool = False) -> dict:
    """`simba eval`: lm-eval tasks (each with its own measured FLOPs) and long-context perplexity on the
    evaluation split of `ppl_data` (any source `finetune` takes). Every setting is checked before any work."""
    from simba_cli.distributed import setup
    from simba_cli.eval.lm import SimbaLM
    from simba_cli.eval.perplexity import check_ppl_args, check_stream, long_context_perplexity, token_stream
    from simba_cli.models.loading import resolve_device
    from simba_cli.provenance import model_fingerprint, provenance
    from simba_cli.report.progress import Bar
    from simba_cli.simba.runner import ModelRunner

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 document per task, got {limit}; leave it out for all")
    if not tasks and not ppl_contexts:
        raise UserError("nothing to evaluate: give --tasks, --ppl-contexts or both")
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if ppl_contexts:
        ppl_contexts = check_ppl_args(ppl_contexts, ppl_score_last, ppl_windows)
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    # a missing CUDA device is an error here, not a silent CPU run; under torchrun, this process's device
    dd, device = setup(resolve_device(device))
    runner = ModelRunner.load(model, device, **(prune or {}))
    lm = SimbaLM(runner=runner, batch_size=batch_size)
    loaded = task_dict(tasks) if tasks else {"tasks": {}}
    stream = None
    if ppl_contexts:  # the held-out text must hold every window, before any task runs
        stream = token_stream(runner.tokenizer, ppl_data)
        check_stream(stream, ppl_contexts, ppl_windows, ppl_score_last, ppl_data)
    requests = count_requests(loaded, limit, num_fewshot)
    config = runner.config
    results = {"model": model, "prune": config.to_dict(), "setting": config.label(),
               "settings": {"tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "fewshot_seed": FEWSHOT_SEED,
                            "batch_size": batch_size, "task_mode": "protect: logits at the continuation only",
                            "ppl_contexts": ppl_contexts, "ppl_score_last": ppl_score_last,
                            "ppl_windows": ppl_windows, "ppl_data": ppl_data if ppl_contexts else None,
                            "ppl_stream": _stream_id(stream, ppl_data)},
               "tasks": {}}
    total = sum(requests.values()) + (len(ppl_contexts) * ppl_windows if ppl_contexts else 0)
    with Bar(progress and dd.main, total, "eval", unit="req") as bar:
        lm.on_progress = bar.advance_by
        for name in loaded["tasks"]:
            bar.describe(name)
            r = run_tasks(lm, only(loaded, name), limit=limit, num_fewshot=num_fewshot)
            docs = r["n_samples"][name]["effective"] if r.get("n_samples") else None
            results["tasks"][name] = {"metrics": r["metrics"].get(name, {}), "docs": docs,
                                      "flops_per_doc": r["measured"].get("flops", 0) / max(1, docs or 1),
                                      "measured": r["measured"]}
        if ppl_contexts:
            bar.describe("perplexity")
            results["perplexity"] = long_context_perplexity(runner.model, stream, config, ppl_contexts,
                                                            ppl_score_last, ppl_windows, batch_size, runner.device,
                                                            on_window=bar.advance_by, dist=dd, on_flops=runner.count)
    results["measured"] = runner.measured()  # every forward: the tasks' and the perplexity windows'
    results["provenance"] = provenance(seed=config.seed, device=str(runner.device), world_size=dd.world,
                                       model_fingerprint=model_fingerprint(model), **_base_of(model))
    return results


def _base_of(model: str) -> dict:
    """A pruned artifact's base model and its fingerprint: the weights that ran."""
    from simba_cli.provenance import model_fingerprint
    from simba_cli.simba.artifact import is_artifact, read_artifact

    if not is_artifact(model):
        return {}
    base = read_artifact(model)[0]
    return {"base_model": base, "base_model_fingerprint": model_fingerprint(base)}


def _stream_id(stream, source: str) -> dict | None:
    """The held-out text the perplexity read, identified: where it came from (a path made absolute), its
    tokens, and a hash of them."""
    if stream is None:
        return None
    import hashlib
    from pathlib import Path

    where = source if source == "shakespeare" or source.startswith("hf:") else str(Path(source).expanduser().resolve())
    digest = hashlib.sha256(stream.cpu().numpy().tobytes()).hexdigest()[:16]
    return {"source": where, "tokens": int(stream.numel()), "sha256": digest}


def result_rows(results: dict) -> list[dict]:
    """Long form, one row per task and metric, narrow enough for an 80-column terminal: task, metric,
    value, stderr."""
    rows = []
    for task, r in results["tasks"].items():
        for name, value in r["metrics"].items():
            if name.endswith("_stderr"):
                continue
            rows.append({"task": task, "metric": name, "value": value, "stderr": r["metrics"].get(f"{name}_stderr")})
    return rows


def cost_rows(results: dict) -> list[dict]:
    """One row per task: documents, measured FLOPs per document and mean keep ratio."""
    return [{"task": task, "docs": r["docs"], "FLOPs/doc": r["flops_per_doc"],
             "mean keep": r["measured"].get("mean_keep")} for task, r in results["tasks"].items()]


def write_results(results: dict, out: Path):
    """results.json (everything), results.csv/.md (long form, the model named), costs and perplexity tables.
    An earlier eval's files in `out` are replaced whole (the caller checked that `out` is an eval's)."""
    import json

    from simba_cli.eval.perplexity import table_rows
    from simba_cli.outdir import atomic_directory
    from simba_cli.report.tables import markdown_table, write_tables

    rows = result_rows(results)
    with atomic_directory(out) as tmp:  # the directory appears, or replaces an earlier eval's, whole
        md = [f"# simba eval: {results['model']} ({results['setting']})\n"]
        if rows:
            write_tables(rows, tmp / "results", formats=("csv",))
            write_tables(cost_rows(results), tmp / "costs", formats=("csv",))
            md += ["## Tasks\n", markdown_table(rows), "## What ran (measured)\n", markdown_table(cost_rows(results))]
        if results.get("perplexity"):
            ppl = table_rows(results["perplexity"])
            write_tables(ppl, tmp / "perplexity", formats=("csv",))
            md += [f"## Long-context perplexity ({results['settings']['ppl_data']})\n", markdown_table(ppl)]
        (tmp / "results.md").write_text("\n".join(md))
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
