"""Long-context perplexity in the PG-19 protocol.

For each context length L, windows of L tokens end at the same positions of a held-out token stream;
the last K tokens of every window are scored (protected: never pruned, full-depth logits) and the
L - K tokens before them are the context, pruned by the schedule. Where the protected tokens outnumber
a layer's budget they win; the measured keep ratios say so. The same tokens are scored at every
L, so the curves differ only by how much context the model could use.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from simba_cli.errors import UserError
from simba_cli.simba.pruned import pruned_forward
from simba_cli.simba.settings import PruneConfig


def token_stream(tokenizer, source: str = "shakespeare", split: str = "evaluation") -> torch.Tensor:
    """The held-out token stream of any data source `finetune` takes (its evaluation split by default)."""
    from simba_cli.data.corpus import load_texts
    from simba_cli.data.tokens import tokenize_documents

    return tokenize_documents(tokenizer, load_texts(source, split))


def check_stream(stream: torch.Tensor, contexts: list[int], windows: int, score_last: int,
                 source: str = "the held-out text"):
    """A one-line error when the stream cannot hold `windows` windows of the longest context whose scored
    tokens (the last `score_last` of each) are all different: windows that share scored tokens would count
    them twice and make the paired statistics over windows look surer than they are. Contexts may overlap."""
    longest = max(contexts)
    need = longest + (windows - 1) * score_last + 1
    if stream.numel() < need:
        raise UserError(f"{source} has {stream.numel()} held-out tokens, too few for {windows} windows of {longest} "
                        f"that score different tokens (the last {score_last} of each: {need} needed); use fewer "
                        f"windows, shorter contexts or fewer scored tokens (--ppl-windows, --ppl-contexts, "
                        f"--ppl-score-last; ppl_windows, ppl_contexts, ppl_score_last in a compare recipe), or more "
                        f"text")


def window_ends(tokens: int, longest: int, windows: int) -> list[int]:
    """Where the windows end, evenly spaced from `longest` to the last token: in float64, whose integers stay
    exact far past any text's length (float32's stop at 2^24 tokens)."""
    return torch.linspace(longest, tokens - 1, windows, dtype=torch.float64).long().tolist()


def check_ppl_args(contexts, score_last: int, windows: int) -> list[int]:
    """The context lengths, sorted; a one-line error for settings that cannot run."""
    contexts = sorted(int(c) for c in contexts)
    if not contexts:
        raise UserError("give at least one context length (--ppl-contexts 256,512,1024)")
    if score_last < 1 or windows < 1:
        raise UserError(f"--ppl-score-last and the number of windows must be positive, got {score_last}, {windows}")
    if contexts[0] <= score_last:
        raise UserError(f"every context length must exceed --ppl-score-last {score_last}; got {contexts[0]}")
    return contexts


@torch.no_grad()
def long_context_perplexity(model, stream: torch.Tensor, config: PruneConfig, contexts=(128, 256, 512, 1024),
                            score_last: int = 64, windows: int = 32, batch_size: int = 8,
                            device="cpu", on_window=None, dist=None, on_flops=None) -> list[dict]:
    """One row per context length: perplexity of the scored tokens, measured FLOPs and keep ratios, each
    window's mean NLL per scored token (`window_nll`, in window order), and `recent_overlap`: of the tokens
    entering the last layer, the share that are the most recent ones (what `recent` would keep with the same
    budget; 1 for dense, truncate and recent), averaged over windows.

    dist (a `distributed.Dist`): under torchrun, each process runs its share of the batches of windows and
    every process gets the rows of the whole run (the same as one process's). on_flops(flops, forwards): told
    what each context's forwards ran (a runner's `count`)."""
    from simba_cli.distributed import Dist

    dist = dist or Dist()
    contexts = check_ppl_args(contexts, score_last, windows)
    check_stream(stream, contexts, windows, score_last)
    longest = contexts[-1]
    ends = window_ends(stream.numel(), longest, windows)  # window = [e - L, e)
    config = dataclasses.replace(config, mode="protect")
    batches = [ends[s:s + batch_size] for s in range(0, len(ends), batch_size)]
    rows = []
    for L in contexts:
        def score(batch, L=L):
            """Each window's NLL summed over its scored tokens, and the FLOPs of the forward."""
            ids = torch.stack([stream[e - L:e] for e in batch]).to(device)
            targets = torch.stack([stream[e - score_last + 1:e + 1] for e in batch]).to(device)
            protected = torch.zeros_like(ids, dtype=torch.bool)
            protected[:, -score_last:] = True
            out = pruned_forward(model, ids, config, protected=protected, trace=True)
            # In protect mode the logits rows are the protected positions, in order.
            logp = F.log_softmax(out.logits[:, -score_last:].float(), dim=-1)
            last = out.kept[-1]  # (b, k) positions entering the last layer, -1 on padding
            k = (last >= 0).sum(1)
            overlap = ((last >= L - k[:, None]) & (last >= 0)).sum(1) / k
            return -logp.gather(2, targets[..., None])[..., 0].sum(1).cpu(), out.flops, overlap.cpu()

        nll, count, flops, per_window, overlaps = 0.0, 0, None, [], []
        for batch, (window_nll, ran, overlap) in dist.spread(batches, score):
            flops = ran if flops is None else flops + ran
            overlaps += overlap.tolist()
            per_window += (window_nll / score_last).tolist()
            nll += float(window_nll.sum())
            count += len(batch) * score_last
            if on_window is not None:
                on_window(len(batch))
        if on_flops is not None:
            on_flops(flops, len(batches))
        rows.append({"context": L, "ppl": math.exp(nll / count), "nll": nll / count, "scored_tokens": count,
                     "flops": flops.total, "flops_per_window": flops.total / len(ends),
                     "mean_keep": flops.mean_keep, "recent_overlap": sum(overlaps) / len(overlaps),
                     "window_nll": per_window})  # per window, for paired differences
    return rows


def table_rows(rows: list[dict]) -> list[dict]:
    """Perplexity rows for a table, narrow enough for a terminal: the per-window list, the total FLOPs and
    the NLL stay in the JSON results."""
    keep = ("model", "setting", "context", "ppl", "scored_tokens", "flops_per_window", "mean_keep", "recent_overlap")
    return [{k: r[k] for k in keep if k in r} for r in rows]
