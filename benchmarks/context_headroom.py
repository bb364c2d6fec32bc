"""How much a zoo model uses its context on the held-out plays, and how much the plays could reward it.

Per rung, on 48 windows of 1024 tokens of the evaluation plays:
    by_position    perplexity of the tokens at positions [a, b) of a window: a model that uses its
                   context predicts later positions better (flat after some position: it uses no more)
    cache          the model's perplexity on positions 512-1023, alone and mixed with a unigram cache of
                   the last W tokens, p = lam p_model + (1 - lam) count_W(token) / W, lam the best of a
                   grid: what the text offers a model that copies tokens from W back, beyond what the
                   model already predicts. The gain from W = 128 to W = 512 bounds (for this simple kind
                   of copying) how much a model of this quality could gain from context past 128 tokens.

    python benchmarks/context_headroom.py        # about a minute; results/context_headroom.json
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write  # noqa: E402

from simba_cli.eval.perplexity import token_stream  # noqa: E402
from simba_cli.models.zoo import names  # noqa: E402
from simba_cli.simba.runner import ModelRunner  # noqa: E402

WINDOW, WINDOWS = 1024, 48
BUCKETS = ((0, 16), (16, 64), (64, 128), (128, 256), (256, 512), (512, 1023))
CACHES = (16, 128, 512)
LAMBDAS = (0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7)


def ppl(probs: torch.Tensor) -> float:
    return math.exp(-probs.log().mean().item())


def measure(name: str) -> dict:
    runner = ModelRunner.load(name, "cpu")
    stream = token_stream(runner.tokenizer)
    ids = stream[:WINDOWS * WINDOW].view(WINDOWS, WINDOW)
    with torch.no_grad():
        logits = runner.model(ids[:, :-1]).float()
    # probs[:, t]: the probability of ids[:, t + 1], read with t + 1 tokens of context
    probs = torch.softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    out = {"by_position": {f"{a}-{b}": ppl(probs[:, a:b]) for a, b in BUCKETS}}
    late = torch.arange(512, WINDOW - 1)
    target = ids[:, late + 1]
    out["cache"] = {"model": ppl(probs[:, late])}
    for w in CACHES:
        history = torch.stack([ids[:, t + 1 - w:t + 1] for t in late.tolist()], 1)  # (windows, positions, w)
        cached = (history == target[..., None]).float().mean(-1)
        out["cache"][f"W{w}"] = min(ppl(lam * probs[:, late] + (1 - lam) * cached) for lam in LAMBDAS)
    return out


def main():
    results = {}
    for name in names("mamba"):
        results[name] = measure(name)
        r = results[name]
        print(f"{name}: ppl by position " + " ".join(f"{k}:{v:.1f}" for k, v in r["by_position"].items())
              + f" | positions 512-1023: model {r['cache']['model']:.1f}, with a cache of "
              + ", ".join(f"{w} tokens {r['cache'][f'W{w}']:.1f}" for w in CACHES), flush=True)
    write("context_headroom", results)


if __name__ == "__main__":
    main()
