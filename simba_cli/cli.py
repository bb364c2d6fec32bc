"""The `simba` command line: each command is a thin typed wrapper over a library function.

Bad input raises `UserError` in the library; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from simba_cli.distributed import is_main_process, world_size
from simba_cli.errors import UserError

# lm-eval and datasets draw a tqdm bar per step; the commands show their own rich progress instead.
os.environ.setdefault("TQDM_DISABLE", "1")

app = typer.Typer(
    name="simba",
    help="Simba: training-free hierarchical token pruning for Mamba LMs, measured against dense Mamba at "
         "equal FLOPs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool):
    if value:
        from simba_cli import version

        typer.echo(f"simba {version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit")] = False,
):
    if not is_main_process():  # under torchrun, rank 0 alone prints: the others' warnings and logs are its own
        import logging
        import warnings

        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)


def command(name: str | None = None, **kwargs):
    """Register a command whose UserErrors end as 'error: ...' on stderr with exit code 2."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            try:
                result = fn(*args, **kw)
                if world_size() > 1:  # under torchrun: wait for every process, then leave the group
                    from simba_cli.distributed import end

                    end()
                return result
            except UserError as e:
                if is_main_process():  # under torchrun every process meets the same error: one says it
                    typer.echo(f"error: {e}", err=True)
                else:  # torchrun ends every process once one has failed: give rank 0 the time to say it
                    time.sleep(2)
                raise typer.Exit(e.exit_code) from None
            except KeyboardInterrupt:
                if is_main_process():
                    typer.echo("interrupted", err=True)
                raise typer.Exit(130) from None

        return app.command(name, **kwargs)(run)

    return wrap


Model = Annotated[str, typer.Argument(help="A zoo name, a local checkpoint directory, a hub id "
                                           "(state-spaces/mamba-130m) or a pruned artifact (simba prune)")]


Schedule = Annotated[str, typer.Option(help="none, linear (the paper's), cosine, constant, step, or truncate "
                                             "(the dense model on the last tokens only)")]
PruneSchedule = Annotated[str, typer.Option(help="linear (the paper's), cosine, constant, step, or truncate (the "
                                                 "dense model on the last tokens only)")]
FinalKeep = Annotated[float, typer.Option(help="Share of the input tokens entering the last layer, in (0, 1]")]
FirstLayer = Annotated[int, typer.Option(help="First layer that sees fewer tokens (layer 0 sees all)")]
Stages = Annotated[int, typer.Option(help="Number of steps of the step schedule")]
CRITERION_HELP = ("simba, simba-abs, simba-gated, random, uniform, recent, dt-norm, output-norm; beyond the "
                  "paper: simba-window[:W[:mean|max]], simba-split[:share], simba-channels[:threshold]")
Criterion = Annotated[str, typer.Option(help=CRITERION_HELP)]
SeqLen = Annotated[int, typer.Option(help="Sequence length the FLOPs are counted at")]
Head = Annotated[str, typer.Option(help="Logits at all positions (perplexity, training) or the last one")]
Format = Annotated[str, typer.Option(help="table (terminal), json, csv or md, printed on stdout")]


def _prune_config(schedule, final_keep, first_layer, stages, criterion, mode="exit"):
    from simba_cli.simba.settings import PruneConfig

    if schedule == "none":
        raise UserError("prune writes a pruned model: --schedule none would be the dense model itself (use it as it "
                        "is), so give a schedule")
    return PruneConfig(schedule, final_keep, first_layer, stages, criterion, mode)


def _emit(rows: list[dict], fmt: str, title: str = ""):
    from simba_cli.report.tables import markdown_table, print_table

    if fmt == "table":
        print_table(rows, title=title)
    elif fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        import pandas as pd

        typer.echo(pd.DataFrame(rows).to_csv(index=False), nl=False)
    elif fmt == "md":
        typer.echo(markdown_table(rows))
    else:
        raise UserError(f"unknown format {fmt!r}; use table, json, csv or md")


@command("prune")
def prune_cmd(
    model: Model,
    out: Annotated[Path, typer.Option(help="Artifact directory to write (simba.yaml)")],
    schedule: PruneSchedule = "linear", final_keep: FinalKeep = 0.1, first_layer: FirstLayer = 1,
    stages: Stages = 4, criterion: Criterion = "simba",
    mode: Annotated[str, typer.Option(help="exit: logits for every position; protect: protected ones only (sets "
                                           "how the artifact's FLOPs count logits; eval and generate choose the "
                                           "mode by request)")] = "exit",
    seq_len: SeqLen = 2048,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing artifact in --out")] = False,
):
    """Write a pruned-model artifact: the base model, schedule, criterion, per-layer keep ratios, FLOPs."""
    from simba_cli.simba.artifact import prune_model

    body = prune_model(model, out, _prune_config(schedule, final_keep, first_layer, stages, criterion, mode),
                       seq_len, overwrite)
    f = body["flops"]
    typer.echo(f"wrote {out / 'simba.yaml'}: {body['base']} with {body['prune']['schedule']} to "
               f"{body['prune']['final_keep']:g} by {body['prune']['criterion']}, mean keep "
               f"{body['mean_keep']:.3f}, {f['ratio']:.3f}x dense FLOPs at {f['seq_len']} tokens")


@command("flops-report")
def flops_report_cmd(
    models: Annotated[list[str] | None, typer.Argument(help="Models: official sizes (mamba-130m ... mamba-2.8b, "
                                                            "mamba2-130m ... mamba2-2.7b), zoo names, directories "
                                                            "or artifacts; default: the official Mamba family")]
    = None,
    schedule: Annotated[str | None, typer.Option(help="linear (default), cosine, constant, step, truncate or none; "
                                                     "an artifact's own unless given")] = None,
    final_keep: Annotated[float | None, typer.Option(help="Share of the tokens entering the last layer "
                                                          "(default 0.1)")] = None,
    first_layer: Annotated[int | None, typer.Option(help="First layer that sees fewer tokens (default 1)")] = None,
    stages: Annotated[int | None, typer.Option(help="Steps of the step schedule (default 4)")] = None,
    criterion: Annotated[str | None, typer.Option(help="Token criterion (default simba)")] = None,
    seq_len: SeqLen = 2048, head: Head = "all",
    per_layer: Annotated[bool, typer.Option(help="Also a per-layer table")] = False,
    format: Format = "table",
    out: Annotated[Path | None, typer.Option(help="Also write flops.csv/.md/.json (and layers.*) and "
                                                  "report.json (settings, versions) here")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a report in an existing --out")] = False,
):
    """FLOPs per model, dense and pruned (analytic, no weights needed), optionally per layer."""
    from simba_cli.models.config import OFFICIAL
    from simba_cli.report.tables import write_tables
    from simba_cli.simba.flops_tables import layer_rows, model_config, summary_row
    from simba_cli.simba.settings import DENSE, PruneConfig

    if format == "csv" and per_layer and out is None:  # two tables with different columns are not one CSV
        raise UserError("--format csv prints one table; with --per-layer give --format json or md, or --out DIR "
                        "(flops.csv and layers.csv)")
    if out is not None:
        from simba_cli.outdir import check_out

        check_out(out, "report.json", "flops-report", overwrite=overwrite, resumable=False)
    given = _prune_overrides(schedule, final_keep, first_layer, stages, criterion)
    requested = PruneConfig(**given)
    rows, layers, prune_of = [], [], {}
    for name in models or list(OFFICIAL):
        cfg, artifact = model_config(name)
        pruned = requested if artifact is None else artifact.override(**given)  # an artifact's own, but the options
        prune_of[name] = pruned.to_dict()
        for config in (DENSE, pruned):
            rows.append(summary_row(name, cfg, config, seq_len, head))
            if per_layer and config is not DENSE:
                layers += layer_rows(name, cfg, config, seq_len, head)
    if format == "json" and per_layer:  # one JSON document on stdout
        typer.echo(json.dumps({"models": rows, "layers": layers}, indent=2))
    else:
        _emit(rows, format, title=f"FLOPs per {seq_len}-token sequence (logits at {head} positions)")
        if per_layer and format == "csv":
            typer.echo(f"the per-layer table: {out}/layers.csv", err=True)
        elif per_layer:
            _emit(layers, format, title="per layer")
    if out is not None:
        from simba_cli.outdir import atomic_directory
        from simba_cli.provenance import provenance

        settings = {"models": models or list(OFFICIAL), "prune": prune_of, "seq_len": seq_len,
                    "head": head, "counted": "analytic, from the schedule (no weights read)"}
        with atomic_directory(out) as tmp:  # appears whole, or replaces an earlier report whole
            write_tables(rows, tmp / "flops")
            if per_layer:
                write_tables(layers, tmp / "layers")
            (tmp / "report.json").write_text(json.dumps({"settings": settings, "provenance": provenance(),
                                                         "models": rows, "layers": layers}, indent=2) + "\n")


@command("flops-match")
def flops_match_cmd(
    big: Annotated[str, typer.Argument(help="The model to prune (official size such as mamba-370m or "
                                            "mamba2-370m, zoo name, directory)")],
    target: Annotated[str, typer.Option(help="The dense model whose FLOPs to match")],
    seq_len: SeqLen = 2048,
    schedule: Annotated[str | None, typer.Option(help="linear (default), cosine, constant, step or truncate; an "
                                                     "artifact's own unless given")] = None,
    first_layer: Annotated[int | None, typer.Option(help="First layer that sees fewer tokens (default 1)")] = None,
    stages: Annotated[int | None, typer.Option(help="Steps of the step schedule (default 4)")] = None,
    criterion: Annotated[str | None, typer.Option(help="Token criterion (default simba)")] = None, head: Head = "all",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
):
    """Find the final_keep at which BIG with Simba costs what TARGET costs dense."""
    from simba_cli.simba.flops_tables import match_final_keep, model_config
    from simba_cli.simba.settings import PruneConfig

    given = _prune_overrides(schedule, None, first_layer, stages, criterion)
    artifact = model_config(big)[1]  # a pruned artifact is matched with its own schedule, but the options given
    base = PruneConfig(**given) if artifact is None else artifact.override(**given)
    m = match_final_keep(big, target, seq_len, base, head)
    if json_out:
        typer.echo(json.dumps(m.to_dict(), indent=2))
    else:
        matched = m.reachable and not m.unneeded
        typer.echo(f"final_keep = {m.final_keep:.6f}: {m.message()}" if matched else m.message())
    if not m.reachable:
        raise typer.Exit(1)


def _prune_overrides(schedule, final_keep, first_layer, stages, criterion) -> dict:
    """Only what the user gave (`PruneConfig.override`): a pruned artifact's own schedule stays."""
    given = dict(schedule=schedule, final_keep=final_keep, first_layer=first_layer, stages=stages,
                 criterion=criterion)
    from simba_cli.simba.settings import check_dense_alone

    given = {k: v for k, v in given.items() if v is not None}
    check_dense_alone(given, lambda key: "--" + key.replace("_", "-"))
    return given


def _ints(text: str | None, name: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--{name} takes comma-separated integers, e.g. 256,512,1024; got {text!r}") from None


@command("eval")
def eval_cmd(
    model: Model,
    tasks: Annotated[str, typer.Option(help="Comma-separated, offline: simba_cloze, simba_choice, simba_recall, "
                                            "simba_recall_long, simba_passkey, simba_passkey_exact, simba_mqar; or "
                                            "lm-eval tasks (piqa, hellaswag, ...; need the hub); \"\" for none")]
    = "simba_cloze,simba_choice,simba_recall",
    limit: Annotated[int | None, typer.Option(help="Documents per task (at least 1; default: all)")] = None,
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples")] = None,
    batch_size: Annotated[int, typer.Option(help="Requests per forward")] = 16,
    schedule: Annotated[str | None, typer.Option(help="Override the schedule (none: dense; truncate: last tokens)")]
    = None,
    final_keep: Annotated[float | None, typer.Option(help="Override: share of the tokens entering the last layer")]
    = None,
    first_layer: Annotated[int | None, typer.Option(help="Override: first layer that sees fewer tokens")] = None,
    stages: Annotated[int | None, typer.Option(help="Override: steps of the step schedule")] = None,
    criterion: Annotated[str | None, typer.Option(help="Override: " + CRITERION_HELP)] = None,
    ppl_contexts: Annotated[str | None, typer.Option(help="Also long-context perplexity at these context "
                                                          "lengths, e.g. 256,512,1024")] = None,
    ppl_score_last: Annotated[int, typer.Option(help="Scored tokens at the end of each window")] = 64,
    ppl_windows: Annotated[int, typer.Option(help="Windows per context length")] = 16,
    ppl_data: Annotated[str, typer.Option(help="Text for perplexity: shakespeare, a file, a directory, a .jsonl/"
                                               ".json/.parquet file, a saved dataset or hf:NAME (its evaluation "
                                               "split, as finetune holds it out)")] = "shakespeare",
    out: Annotated[Path | None, typer.Option(help="Write results.json / .csv / .md here")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the results of an earlier eval in --out")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
):
    """Evaluate a model (dense or pruned) on lm-eval tasks and long-context perplexity, with measured FLOPs."""
    from simba_cli.eval.harness import cost_rows, evaluate_model, result_rows, write_results
    from simba_cli.eval.perplexity import table_rows
    from simba_cli.outdir import check_out
    from simba_cli.report.tables import print_table

    if out is not None:
        check_out(out, "results.json", "eval", overwrite=overwrite, resumable=False)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    results = evaluate_model(model, task_list, limit, num_fewshot, batch_size, device,
                             _prune_overrides(schedule, final_keep, first_layer, stages, criterion),
                             _ints(ppl_contexts, "ppl-contexts"), ppl_score_last, ppl_windows, ppl_data,
                             progress=not quiet)
    if not is_main_process():  # data parallel: every process holds the results; rank 0 prints and writes them
        return
    title = f"{model}: {results['setting']}"
    if results["tasks"]:
        print_table(result_rows(results), title=title)
        print_table(cost_rows(results), title="what ran (measured)")
    if results.get("perplexity"):
        print_table(table_rows(results["perplexity"]), title=f"long-context perplexity ({ppl_data})")
    if out is not None:
        write_results(results, out)
        typer.echo(f"results in {out}")


@command("compare")
def compare_cmd(
    recipe: Annotated[Path | None, typer.Option(help="YAML compare recipe (default: recipes/compare.yaml's "
                                                     "settings, built in)")] = None,
    models: Annotated[str | None, typer.Option(help="Override: comma-separated ladder, smallest first")] = None,
    tasks: Annotated[str | None, typer.Option(help="Override: comma-separated tasks")] = None,
    limit: Annotated[int | None, typer.Option(help="Override: documents per task")] = None,
    out: Annotated[Path, typer.Option(help="Output directory")] = Path("runs/compare"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted compare in --out")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
):
    """The main job: dense vs Simba-pruned models at matched FLOPs; tables, FLOPs-accuracy and context plots."""
    from simba_cli.eval.compare import CompareSpec, run_compare
    from simba_cli.eval.perplexity import table_rows
    from simba_cli.report.tables import print_table

    spec = CompareSpec.from_yaml(recipe) if recipe else CompareSpec()
    changes = {}
    if models:
        changes["models"] = [m.strip() for m in models.split(",") if m.strip()]
    if tasks:
        changes["tasks"] = [t.strip() for t in tasks.split(",") if t.strip()]
    if limit is not None:
        changes["limit"] = limit
    if changes:
        spec = CompareSpec(**{**spec.__dict__, **changes})
    summary = run_compare(spec, out, overwrite=overwrite, resume=resume, progress=not quiet)
    if not is_main_process():  # data parallel: rank 0 wrote the outputs and prints them
        return
    rows = [{"model": Path(r["model"]).name, "setting": r["setting"], "task": r["task"], "metric": r["metric"],
             "value": r.get(r["metric"]), "FLOPs/doc": r["flops_per_doc"], "keep": r["mean_keep"],
             "vs_dense": r["vs_dense"]} for r in summary["rows"]]
    print_table(rows, title="dense vs Simba at measured FLOPs (vs_dense: minus the dense curve at equal FLOPs)")
    if summary["paired"]:
        keep = ("subject", "setting", "task", "vs", "diff", "stderr", "beyond_2se")
        print_table([{"model": Path(p["model"]).name} | {k: p[k] for k in keep} for p in summary["paired"]
                     if p["vs"] != "dense"], title="subject minus baseline, paired (positive: the subject better)")
        print_table(summary["pooled"], title="pooled over models, keeps and tasks (positive: the subject better; "
                                             "z_documents pools per document, z_comparisons overstates)")
    if summary["perplexity"]:
        print_table(table_rows(summary["perplexity"]), title="long-context perplexity")
    typer.echo(f"tables, plots and summary.json in {out} ({summary['elapsed_s']:.0f} s; its evaluations, summed "
               f"over every run that computed them: {summary['compute_s']:.0f} s)")
    if len(summary["parts_computed_by"]) > 1:
        commits = ", ".join(str(c["git_commit"])[:10] for c in summary["parts_computed_by"])
        typer.echo(f"note: its evaluations were computed by {len(summary['parts_computed_by'])} versions of the code "
                   f"({commits}; summary.json: parts_computed_by); --overwrite computes them all again")


@command("generate")
def generate_cmd(
    model: Model,
    prompt: Annotated[str, typer.Option(help="The prompt text")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate")] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sample from the smallest set of tokens this likely (1: all)")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling (no effect at temperature 0)")] = 0,
    schedule: Annotated[str | None, typer.Option(help="Prune the prompt's prefill (none = dense)")] = None,
    final_keep: Annotated[float | None, typer.Option(help="Share of the prompt entering the last layer")] = None,
    criterion: Annotated[str | None, typer.Option(help="Token criterion (default simba): " + CRITERION_HELP)] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
):
    """Generate text: a Simba-pruned prefill of the prompt (or a dense one), then recurrent decoding."""
    from simba_cli.simba.runner import ModelRunner

    runner = ModelRunner.load(model, device, **_prune_overrides(schedule, final_keep, None, None, criterion))
    typer.echo(runner.generate_text(prompt, max_new_tokens, temperature, top_p, seed))
    m = runner.measured()  # on stderr: what ran, without mixing into the text
    typer.echo(f"prefill {runner.config.describe()}; {m.get('flops', 0):.4g} FLOPs measured for the prefill and "
               f"the decoding steps together", err=True)


@command("finetune")
def finetune_cmd(
    model: Annotated[str | None, typer.Argument(
        help="Model to continue (a pruned artifact trains with pruning active); leave out to train the recipe's "
             "model from scratch")] = None,
    recipe: Annotated[Path, typer.Option(help="YAML training recipe (see recipes/)")] = Path("recipes/zoo-m.yaml"),
    out: Annotated[Path, typer.Option(help="Run directory")] = Path("runs/finetune"),
    data: Annotated[str | None, typer.Option(help="Override data.source: shakespeare, a file, a directory, "
                                                  "a saved dataset, or hf:NAME")] = None,
    steps: Annotated[int | None, typer.Option(help="Override train.steps")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in --out")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available)")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar")] = False,
):
    """Train with pruning active (given a pruned artifact), continue a model, or train from scratch."""
    from simba_cli.train.loop import finetune
    from simba_cli.train.recipe import load_recipe

    r = load_recipe(recipe)
    if data is not None:
        r.data.source = data
    if steps is not None:
        r.train.steps = steps
        r.__post_init__()
    metrics = finetune(r, out, init_from=model, resume=resume, overwrite=overwrite, device=device,
                       progress=not quiet)
    if metrics:
        typer.echo(f"held-out perplexity {metrics['val_ppl']:.3f} after {metrics['steps']} steps "
                   f"({metrics['train_time_s']:.0f} s); model in {out / 'model'}")


@command("zoo")
def zoo_cmd(json_out: Annotated[bool, typer.Option("--json", help="Print JSON")] = False):
    """List the embedded tiny models: family, size, FLOPs per token, held-out perplexity."""
    from simba_cli.models import zoo
    from simba_cli.report.tables import print_table

    rows = [zoo.info(n) for n in zoo.names()]
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        raise UserError("the zoo is empty in this installation; train it with `make zoo`")
    print_table([{"model": r["name"], "family": r["family"], "params": r["params"], "FLOPs/token": r["flops_per_token"],
                  "ppl@128": r["ppl_ctx128"], "ppl@1024": r["ppl_ctx1024"],
                  "context gain (± 2 se)": context_gain(r.get("context_gain"), r.get("context_gain_se")),
                  "passkey": r["passkey_acc"],
                  "train (s)": r["train_time_s"]} for r in rows],
                title="simba zoo (Shakespeare with recall documents, byte-level BPE)")


def context_gain(gain: float | None, se: float | None) -> str:
    """What 1024 tokens of context gain over 128, in % of perplexity, with two standard errors: '+0.9% ± 0.2'."""
    if gain is None or se is None:
        return "-"
    return f"{100 * (math.exp(gain) - 1):+.1f}% ± {200 * se:.1f}"


def main():
    """The `simba` command: usage errors (a missing argument, an unknown option or command, a value of the
    wrong type) in one line, exit code 2, as every other bad input."""
    try:  # newer typer carries its own copy of click
        from typer._click import exceptions as cx
    except ImportError:
        from click import exceptions as cx
    abort = getattr(cx, "Abort", typer.Abort)

    try:
        code = app(standalone_mode=False)
    except cx.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `simba` alone: its help (rich has printed it already)
            if e.format_message().strip():
                e.show()
            sys.exit(0)
        if is_main_process():  # under torchrun every process meets it: one says it
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            typer.echo(f"error: {e.format_message().rstrip('.')}{hint}", err=True)
        sys.exit(2)
    except cx.ClickException as e:
        if is_main_process():
            typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except abort:
        if is_main_process():
            typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)

if __name__ == "__main__":
    main()
