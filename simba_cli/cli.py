"""The `simba` command line: each command is a thin typed wrapper over a library function.

Bad input raises `UserError` in the library; here it becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer

from simba_cli.errors import UserError

app = typer.Typer(
    name="simba",
    help="Simba: training-free hierarchical token pruning for Mamba LMs, measured against dense Mamba at "
         "equal FLOPs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def command(name: str | None = None, **kwargs):
    """Register a command whose UserErrors end as 'error: ...' on stderr with exit code 2."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kw):
            try:
                return fn(*args, **kw)
            except UserError as e:
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(e.exit_code) from None

        return app.command(name, **kwargs)(run)

    return wrap


Model = Annotated[str, typer.Argument(help="A zoo name, a local checkpoint directory, a hub id "
                                           "(state-spaces/mamba-130m) or a pruned artifact (simba prune)")]


@command("finetune")
def finetune_cmd(
    model: Annotated[str | None, typer.Argument(help="Model to continue (a pruned artifact trains with pruning "
                                                     "active); leave out to train the recipe's model from scratch")] = None,
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
    """List the embedded tiny models: size, FLOPs per token, held-out perplexity."""
    from simba_cli.models import zoo
    from simba_cli.report.tables import print_table

    rows = [zoo.info(n) for n in zoo.names()]
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        raise UserError("the zoo is empty in this installation; train it with `make zoo`")
    print_table([{"model": r["name"], "params": r.get("parameters"), "FLOPs/token": r.get("flops_per_token"),
                  "held-out ppl": r.get("val_ppl"), "train time (s)": r.get("train_time_s")} for r in rows],
                title="simba zoo (Shakespeare, byte-level BPE)")


def main():
    app()


if __name__ == "__main__":
    main()
