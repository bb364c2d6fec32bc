"""The measurement behind simba-channels' default threshold: per layer of zoo rungs, the share of channels whose
decay over 1024 tokens of the *training* plays (four windows) reaches each threshold.

    python benchmarks/channel_decay.py            # a few seconds; prints one line per rung
"""

import math

import torch

from simba_cli.data.corpus import load_texts
from simba_cli.data.tokens import tokenize_documents
from simba_cli.simba.criteria_beyond import channel_decay
from simba_cli.simba.runner import ModelRunner

THRESHOLDS = (0.5, 0.1, 0.05, 0.01, 1e-3)


def main():
    print("share of a layer's channels with decay >= " + " / ".join(f"{t:g}" for t in THRESHOLDS))
    for name in ("zoo-xxxs", "zoo-xs", "zoo-s"):
        runner = ModelRunner.load(name, "cpu")
        stream = tokenize_documents(runner.tokenizer, load_texts("shakespeare", "train"))
        ids = torch.stack([stream[i * 5000:i * 5000 + 1024] for i in range(4)])
        lengths = torch.full((4,), 1024)
        hidden, residual, layers = runner.model.embed(ids), None, []
        with torch.no_grad():
            for block in runner.model.layers:
                out, residual = block(hidden, residual, lengths, keep_scan_inputs=True)
                hidden = out.out
                log_decay = channel_decay(out.scan, lengths)
                layers.append(" ".join(f"{float((log_decay >= math.log(t)).double().mean()):.2f}" for t in THRESHOLDS))
        print(f"{name}: " + " | ".join(layers))


if __name__ == "__main__":
    main()
