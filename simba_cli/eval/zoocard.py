"""What `simba zoo` shows of each model, measured once after training (`make zoo` runs it):

    family                    mamba or mamba2, from the published config.json
    ppl_ctx128, ppl_ctx1024   held-out perplexity of the last 32 tokens of 512 windows of the evaluation
                              plays, with 128 and with 1024 tokens of context (the PG-19 protocol):
                              a model that uses its context has the second lower
    context_gain              the mean over those windows of (NLL with 128 tokens) - (NLL with 1024 tokens),
                              nats per scored token, = log(ppl_ctx128 / ppl_ctx1024); positive where the longer
                              context helps. context_gain_se is its standard error over the paired windows (the
                              same scored tokens with either context), so a gain is told from noise
    passkey_acc               greedy exact match of the pass key (simba_passkey's documents at the model's
                              training length, every depth), dense; passkey_by_depth the same per depth
    val_ppl                   the run's held-out perplexity (validation windows of its recipe), measured again
                              on the published weights; val_ppl_fp32 is the run's own, before bf16

    python -m simba_cli.eval.zoocard runs/zoo/zoo-m           # publish a trained run into the zoo
    python -m simba_cli.eval.zoocard --card zoo-m             # measure a published model's card again (weights
                                                              # untouched), after the card's protocol changed

Publishing stores the weights in bfloat16 (the zoo ships inside the package; they load as float32),
copies the tokenizer, recipe, run record and training log beside them, and measures the card on the
published copy, so the card describes exactly the weights that ship.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

CONTEXTS = (128, 1024)
# 32 windows (1,024 scored tokens) left a context's effect of about 1% inside the noise; over 512 windows its
# standard error is about 0.1% (nats per token), and the measurement takes about 20 s for a zoo rung.
WINDOWS = 512


def measure(model_dir: str | Path, length: int | None = None, score_last: int = 32, windows: int | None = None) -> dict:
    from simba_cli.eval.perplexity import long_context_perplexity, token_stream
    from simba_cli.eval.stats import paired
    from simba_cli.eval.tasks import PASSKEY_LENGTHS, build_tasks
    from simba_cli.models.checkpoint import family
    from simba_cli.simba.runner import ModelRunner
    from simba_cli.simba.settings import DENSE

    runner = ModelRunner.load(str(model_dir), "cpu")
    metrics_path = Path(model_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    length = length or metrics.get("val_seq_len") or 1024
    windows = windows or WINDOWS
    length = max([n for n in PASSKEY_LENGTHS if n <= length] or [PASSKEY_LENGTHS[0]])
    rows = long_context_perplexity(runner.model, token_stream(runner.tokenizer), DENSE, CONTEXTS, score_last,
                                   windows, 8, runner.device)
    card = {"family": family(runner.model.cfg), **{f"ppl_ctx{r['context']}": r["ppl"] for r in rows}}
    gain, gain_se = paired(rows[0]["window_nll"], rows[-1]["window_nll"])  # NLL@128 - NLL@1024, window by window
    card.update(context_gain=gain, context_gain_se=gain_se, ppl_windows=windows, ppl_scored_per_window=score_last)
    docs = [json.loads(line) for line in (build_tasks() / "simba_passkey.jsonl").read_text().splitlines()]
    docs = [d for d in docs if d["length"] == length]
    by_depth: dict[str, list[bool]] = {}
    tok = runner.tokenizer
    for i in range(0, len(docs), 8):
        batch = docs[i:i + 8]
        pairs = [(tok.encode(d["context"]), tok.encode(" " + d["answer"])) for d in batch]
        for d, (_, greedy) in zip(batch, runner.loglikelihood(pairs)):
            by_depth.setdefault(f"{d['depth']:g}", []).append(greedy)
    hits = [h for v in by_depth.values() for h in v]
    card.update(passkey_acc=sum(hits) / len(hits), passkey_length=length, passkey_docs=len(hits),
                passkey_by_depth={k: sum(v) / len(v) for k, v in sorted(by_depth.items())})
    if (Path(model_dir) / "recipe.yaml").is_file() and "val_ppl" in metrics:
        card.update(val_ppl=held_out_ppl(runner, Path(model_dir) / "recipe.yaml"),
                    val_ppl_fp32=metrics.get("val_ppl_fp32", metrics["val_ppl"]))
    return card


def held_out_ppl(runner, recipe_path: Path) -> float:
    """Perplexity on the validation windows the run was evaluated on (its recipe's data section), the mean
    next-token cross-entropy over every target as training's dense evaluation takes it (a test checks the two
    agree)."""
    import torch
    import torch.nn.functional as F
    import yaml

    from simba_cli.data.corpus import load_texts
    from simba_cli.data.tokens import eval_windows, tokenize_documents

    data = yaml.safe_load(recipe_path.read_text())["data"]  # the run's resolved recipe: every key is there
    docs = load_texts(data["source"], "validation", data["text_field"])
    windows = eval_windows(tokenize_documents(runner.tokenizer, docs), data["seq_len"], data["val_tokens"])
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], 8):
            batch = windows[i:i + 8].to(runner.device)
            logits = runner.model(batch[:, :-1])
            targets = batch[:, 1:]
            total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).item() * targets.numel()
            count += targets.numel()
    return math.exp(total / count)


def publish(run: str | Path, name: str | None = None) -> dict:
    """Copy a finished run's model into the package's zoo (bf16 weights) and measure its card there."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from simba_cli.errors import UserError
    from simba_cli.models.zoo import ZOO_DIR
    from simba_cli.outdir import atomic_directory

    run = Path(run)
    if not (run / "metrics.json").is_file():
        raise UserError(f"{run} is not a finished training run (no metrics.json); finish it first")
    name = name or run.name
    target = ZOO_DIR / name
    with atomic_directory(target) as tmp:
        for f in (run / "model").iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, tmp / f.name)
        shutil.copy(run / "run.json", tmp / "run.json")
        weights = load_file(str(run / "model" / "model.safetensors"))
        save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        card = measure(tmp)  # before the model appears in the zoo: it appears with its card or not at all
        metrics = json.loads((tmp / "metrics.json").read_text())
        (tmp / "metrics.json").write_text(json.dumps({**metrics, **card, "weights": "bfloat16"}, indent=2) + "\n")
    return card


def remeasure(name: str) -> dict:
    """Measure a published zoo model's card again, in place: its weights, recipe and run record stay as they are."""
    from simba_cli.errors import UserError
    from simba_cli.models import zoo
    from simba_cli.outdir import write_atomic

    target = zoo.path(name)
    if target is None:
        raise UserError(f"no zoo model named {name!r}; `simba zoo` lists them")
    card = measure(target)
    metrics = json.loads((target / "metrics.json").read_text())
    write_atomic(target / "metrics.json", json.dumps({**metrics, **card}, indent=2) + "\n")
    return card


def main():
    import argparse

    from simba_cli.errors import UserError

    parser = argparse.ArgumentParser(description="Publish trained runs into the zoo, or measure published cards again.")
    parser.add_argument("items", nargs="+", metavar="RUN_OR_NAME", help="training runs (runs/zoo/NAME), or with "
                                                                         "--card the names of published models")
    parser.add_argument("--card", action="store_true", help="measure the named zoo models' cards again, in place")
    args = parser.parse_args()
    try:
        for item in args.items:
            card = remeasure(item) if args.card else publish(item)
            print(f"{item}: " + ", ".join(f"{k} {v:.3g}" for k, v in card.items() if isinstance(v, float)), flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
