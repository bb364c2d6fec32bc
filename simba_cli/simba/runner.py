"""A model ready to run, dense or Simba-pruned: what `simba generate`, perplexity, `compare` and the lm-eval
adapter share. It loads (a zoo name, a checkpoint directory, a hub id or a pruned artifact), holds the prune
settings, scores continuations, generates, and adds up the FLOPs of everything it ran.

    runner = ModelRunner.load("zoo-m", final_keep=0.1)        # any prune option implies linear
    runner.loglikelihood([(context_ids, continuation_ids)], mode="protect")   # -> [(sum logp, greedy)]
    runner.generate_text("To be, or not", max_new_tokens=32)
    runner.measured()         # FLOPs and tokens per layer of every forward so far (what really ran)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from simba_cli.errors import UserError
from simba_cli.simba.flops import FlopsCount, analytic, count_head, count_layer
from simba_cli.simba.pruned import pruned_forward, pruned_prefill
from simba_cli.simba.settings import DENSE, PruneConfig


class ModelRunner:
    def __init__(self, loaded, config: PruneConfig = DENSE, device: torch.device | str = "cpu"):
        """loaded: a `models.loading.LoadedModel` (with its tokenizer)."""
        if loaded.tokenizer is None:
            raise UserError(f"{loaded.ref} has no tokenizer; give one (tokenizer=DIR)")
        self.loaded = loaded
        self.device = torch.device(device)
        self.model = loaded.model.to(self.device).eval()
        self.tokenizer = loaded.tokenizer
        self.config = config
        self.flops: FlopsCount | None = None  # the sum over every forward
        self.forwards = 0

    @classmethod
    def load(cls, ref: str, device: str | torch.device | None = None, dtype: str = "float32",
             tokenizer: str | None = None, fall_back: bool = False, **overrides) -> ModelRunner:
        """Load `ref`; a pruned artifact brings its own settings, which the given options override."""
        from simba_cli.models.loading import DTYPES, resolve_device
        from simba_cli.simba.artifact import load_any

        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        device = resolve_device(device, fall_back=fall_back)
        loaded, own = load_any(str(ref), device=device, dtype=DTYPES[dtype], tokenizer=tokenizer)
        return cls(loaded, (own or DENSE).override(**overrides), device)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # --- what ran -----------------------------------------------------------------------------------------
    def count(self, flops: FlopsCount | None, forwards: int = 1):
        """Add what ran: one forward, or (data parallel) another process's `forwards` summed in `flops`."""
        if flops is None:
            return
        self.flops = flops if self.flops is None else self.flops + flops
        self.forwards += forwards

    def measured(self) -> dict:
        """What really ran: FLOPs (total, per input token) and the tokens entering each layer."""
        if self.flops is None:
            return {"forwards": 0}
        return {"forwards": self.forwards, **self.flops.summary()}

    # --- scoring ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, batch: list[tuple[list[int], list[int]]], mode: str = "protect",
                      max_length: int | None = None) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given its context, and whether it is the greedy one.

        One padded forward for the batch. protect: the continuation's positions are protected (never pruned)
        and alone get logits; exit: every position gets logits, the pruned ones through their early exits.
        Inputs longer than max_length + 1 keep their last tokens (a continuation longer than that is cut)."""
        inputs, n_cont, targets = [], [], []
        for ctx, cont in batch:
            whole = ctx + cont
            if max_length is not None:
                whole = whole[-(max_length + 1):]
            k = min(len(cont), len(whole) - 1)
            inputs.append(whole[:-1])
            n_cont.append(k)
            targets.append(whole[-k:])
        lengths = torch.tensor([len(x) for x in inputs], device=self.device)
        ids = torch.zeros(len(inputs), int(lengths.max()), dtype=torch.long, device=self.device)
        protected = torch.zeros_like(ids, dtype=torch.bool)
        for i, (x, k) in enumerate(zip(inputs, n_cont)):
            ids[i, :len(x)] = torch.tensor(x)
            protected[i, len(x) - k:len(x)] = True
        config = dataclasses.replace(self.config, mode=mode)
        out = pruned_forward(self.model, ids, config, lengths, protected=protected if mode == "protect" else None)
        self.count(out.flops)
        results = []
        for i, (x, k) in enumerate(zip(inputs, n_cont)):
            rows = (out.positions[i] >= len(x) - k) & (out.positions[i] < len(x)) & out.valid[i]
            logp = F.log_softmax(out.logits[i][rows].float(), dim=-1)  # (k, V), in position order
            target = torch.tensor(targets[i], device=self.device)
            picked = logp.gather(1, target[:, None]).squeeze(1)
            results.append((float(picked.sum()), bool((logp.argmax(-1) == target).all())))
        return results

    # --- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 0, top_k: int = 0, stop=None) -> list[int]:
        """New tokens after `ids`: a (pruned) prefill, then recurrent decoding, up to the end-of-text token,
        which is not returned, or until stop(new ids so far) is true (`models.decode.generate`)."""
        from simba_cli.models.decode import generate, prefill

        if not ids:
            raise UserError("the prompt is empty; give some text")
        measured = []  # a pruned prefill's FLOPs, as its forward counted them
        prefill_fn = prefill if self.config.dense else pruned_prefill(self.config, on_flops=measured.append)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        new = generate(self.model, torch.tensor([ids], device=self.device), max_new_tokens, prefill_fn=prefill_fn,
                       eos_token_id=self.eos_token_id, temperature=temperature, top_k=top_k, top_p=top_p,
                       generator=gen, stop=None if stop is None else lambda new: stop(new[0].tolist()))
        self.count(generation_flops(self.model.cfg, self.config, len(ids), new.shape[1],
                                    measured[0] if measured else None))  # a dense prefill: exact as counted
        tokens = new[0].tolist()
        return tokens[:tokens.index(self.eos_token_id)] if self.eos_token_id in tokens else tokens

    def generate_text(self, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0) -> str:
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise UserError("the prompt is empty; give some text with --prompt")
        return self.tokenizer.decode(self.generate_ids(ids, max_new_tokens, temperature, top_p, seed))


def generation_flops(cfg, config: PruneConfig, prompt_tokens: int, new_tokens: int,
                     prefill: FlopsCount | None = None) -> FlopsCount:
    """FLOPs of one generation: the (pruned) prefill of the prompt with logits at its last token (`prefill`, as
    its forward measured it, or as `pruned_forward` counts a single sequence), then one dense recurrent step per
    further token. The decode steps add to every layer and the head; the keep ratios stay those of the prompt."""
    if prefill is None:
        ratios = None if config.dense else config.keep_ratios(cfg.n_layer)
        prefill = analytic(cfg, prompt_tokens, ratios, config.criterion, head_positions=1)
    count = dataclasses.replace(prefill)
    steps = max(0, new_tokens - 1)  # the prefill's logits give the first new token
    count.layer = [f + count_layer(cfg, steps) for f in count.layer]
    count.head += count_head(cfg, steps)
    count.head_positions += steps
    return count
