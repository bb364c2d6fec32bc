"""What each zoo model gains from context on the held-out plays, as a curve: the zoo card's measurement
(`simba_cli.eval.zoocard`: the last 32 tokens of 512 windows of the evaluation plays) at several context
lengths, each paired with 128 tokens over the same scored tokens.

    gain[L] = mean over windows of NLL(128 tokens of context) - NLL(L tokens), nats per scored token, with its
              standard error over the paired windows (positive: the longer context helps)

    python benchmarks/context_gain.py            # about 5 minutes; results/context_gain.json
    python benchmarks/context_gain.py --split validation zoo-m     # other plays, any models: prints, writes nothing
    python benchmarks/context_gain.py runs/probe-zoo-xxs-continue/model
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write  # noqa: E402

from simba_cli.eval.perplexity import long_context_perplexity, token_stream  # noqa: E402
from simba_cli.eval.stats import paired  # noqa: E402
from simba_cli.eval.zoocard import WINDOWS  # noqa: E402
from simba_cli.models.zoo import names  # noqa: E402
from simba_cli.simba.runner import ModelRunner  # noqa: E402
from simba_cli.simba.settings import DENSE  # noqa: E402

CONTEXTS = (64, 128, 256, 512, 768, 896, 960, 1024)
BASE, SCORED = 128, 32


def measure(name: str, split: str = "evaluation") -> dict:
    runner = ModelRunner.load(name, "cpu")
    with torch.no_grad():
        rows = long_context_perplexity(runner.model, token_stream(runner.tokenizer, split=split), DENSE, CONTEXTS,
                                       SCORED, WINDOWS, 16, "cpu")
    base = next(r for r in rows if r["context"] == BASE)["window_nll"]
    result = {}
    for r in rows:
        gain, se = paired(base, r["window_nll"])
        result[str(r["context"])] = {"ppl": r["ppl"], "gain": gain, "gain_se": se}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="zoo names or model directories (default: the whole zoo, written "
                                                  "to results/context_gain.json)")
    parser.add_argument("--split", default="evaluation", help="the plays' split: evaluation (default) or validation")
    args = parser.parse_args()
    results = {"windows": WINDOWS, "scored_per_window": SCORED, "base_context": BASE, "split": args.split}
    for name in args.models or names():
        curve = results[name] = measure(name, args.split)
        gains = " | ".join(f"{c}: {100 * g['gain']:+.2f} ± {100 * g['gain_se']:.2f}" for c, g in curve.items())
        print(f"{name} (ppl {curve[str(BASE)]['ppl']:.1f} at {BASE} tokens, {curve[str(CONTEXTS[-1])]['ppl']:.1f} at "
              f"{CONTEXTS[-1]}): {gains} (nats per token x 100, about % of perplexity; ± 1 se)", flush=True)
    if not args.models and args.split == "evaluation":
        write("context_gain", results)


if __name__ == "__main__":
    main()
