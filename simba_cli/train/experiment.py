"""The paper's fine-tuning experiment in miniature (claim 4): does training with Simba pruning active
adapt a model to its pruning?

    1. held-out perplexity of the base model, dense and pruned (training-free Simba)
    2. continue it for N steps with pruning active (loss on every position, through the early exits)
    3. the control: continue it for the same N steps dense (the zoo models are not trained to
       convergence, so any extra training helps; only the difference to this control is the effect)
    4. held-out perplexity of both, dense and pruned

    python -m simba_cli.train.experiment [--base zoo-m] [--recipe recipes/finetune-zoo-m-simba.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from simba_cli.outdir import write_atomic
from simba_cli.provenance import provenance
from simba_cli.report.tables import print_table, write_tables
from simba_cli.train.loop import LossFn, evaluate_loss, finetune
from simba_cli.train.recipe import load_recipe


def held_out_ppl(model_ref: str, recipe) -> dict:
    """Dense and pruned perplexity of a model on the recipe's held-out windows."""
    from simba_cli.data.corpus import load_texts
    from simba_cli.data.tokens import eval_windows, tokenize_documents
    from simba_cli.simba.artifact import load_any

    loaded, _ = load_any(model_ref)
    stream = tokenize_documents(loaded.tokenizer, load_texts(recipe.data.source, "validation", recipe.data.text_field))
    windows = eval_windows(stream, recipe.data.seq_len, recipe.data.val_tokens)
    out = {}
    for label, prune in (("dense", None), ("pruned", recipe.prune)):
        r = dataclasses.replace(recipe, prune=prune)
        out[label] = math.exp(evaluate_loss(loaded.model, windows, LossFn(r), recipe.train.batch_size, "cpu"))
    return out


def run(base: str, recipe_path: Path, out: Path, overwrite: bool = False) -> dict:
    from simba_cli.simba.artifact import prune_model

    recipe = load_recipe(recipe_path)
    out.mkdir(parents=True, exist_ok=True)
    prune_model(base, out / "artifact", recipe.prune, recipe.data.seq_len, overwrite=True)
    simba = finetune(recipe, out / "simba", init_from=str(out / "artifact"), overwrite=overwrite,
                     resume=(out / "simba" / "checkpoint.pt").is_file() and not overwrite, progress=True)
    control = dataclasses.replace(recipe, prune=None, name=recipe.name + "-dense-control")
    finetune(control, out / "dense", init_from=base, overwrite=overwrite,
             resume=(out / "dense" / "checkpoint.pt").is_file() and not overwrite, progress=True)
    rows = []
    for label, ref in (("base (training-free)", base), ("fine-tuned with Simba", str(out / "simba" / "model")),
                       ("fine-tuned dense (control)", str(out / "dense" / "model"))):
        ppl = held_out_ppl(ref, recipe)
        rows.append({"model": label, "dense_ppl": ppl["dense"], "pruned_ppl": ppl["pruned"],
                     "pruned_minus_dense": ppl["pruned"] - ppl["dense"]})
    result = {"base": base, "recipe": recipe.to_dict(), "steps": simba.get("steps"), "rows": rows,
              "provenance": provenance(seed=recipe.train.seed)}
    write_atomic(out / "experiment.json", json.dumps(result, indent=2) + "\n")
    write_tables(rows, out / "experiment", formats=("csv", "md"))
    print_table(rows, title=f"held-out perplexity, {base}, {recipe.prune.schedule} to {recipe.prune.final_keep:g}")
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="zoo-m")
    p.add_argument("--recipe", type=Path, default=Path("recipes/finetune-zoo-m-simba.yaml"))
    p.add_argument("--out", type=Path, default=Path("runs/finetune-experiment"))
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args()
    run(a.base, a.recipe, a.out, a.overwrite)


if __name__ == "__main__":
    main()
