"""The lm-eval model `simba`: a Mamba LM, dense or Simba-pruned, behind lm-eval's LM interface.

    lm_eval's Python API:  simple_evaluate(model="simba", model_args="pretrained=zoo-m,schedule=linear,...")
    its command line:      python -m simba_cli.lm_eval run --model simba --model_args pretrained=... --tasks ...

Requests and pruning:
    loglikelihood          the continuation's positions are protected (never pruned; full-depth logits)
                           and only they get logits ("protect" mode); padding never enters a ranking
    loglikelihood_rolling  lm-eval's disjoint rolling windows; every position is scored through the
                           early exits ("exit" mode): the perplexity of the pruned model as a whole
    generate_until         a Simba-pruned prefill of the prompt, then recurrent decoding

`pretrained` is a zoo name, a local checkpoint, a hub id or a pruned artifact (whose schedule is the
default; explicit schedule arguments override it). The FLOPs of every forward are counted from the
tokens each layer really processed, and reported with the tokens per layer (`measured()`).
Data parallel like lm-eval's `hf` model: under `accelerate launch`, each process takes its share.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from simba_cli.errors import UserError
from simba_cli.models.loading import resolve_device
from simba_cli.simba.flops import FlopsCount, analytic, count_head, count_layer
from simba_cli.simba.pruned import DENSE, PruneConfig, pruned_forward, pruned_prefill

_PRUNE_KEYS = ("schedule", "final_keep", "first_layer", "stages", "criterion", "seed")


def _as_int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be an integer, got {value!r}") from None


# lm-eval's own CLI (simba_cli.lm_eval) keeps every SimbaLM it makes, to report what they ran; elsewhere
# nothing holds on to a model
KEEP_INSTANCES = False
INSTANCES: list = []


@register_model("simba")
class SimbaLM(TemplateLM):
    def __init__(self, pretrained: str = "zoo-m", batch_size=8, max_length=2048, device: str | None = None,
                 dtype: str = "float32", tokenizer: str | None = None, model=None, **prune_args):
        super().__init__()
        unknown = set(prune_args) - set(_PRUNE_KEYS) - {"max_batch_size", "trust_remote_code"}
        if unknown:
            raise UserError(f"unknown simba model arguments {sorted(unknown)}; known: pretrained, batch_size, "
                            f"max_length, device, dtype, tokenizer, {', '.join(_PRUNE_KEYS)}")
        self.accelerator = None
        self._init_distributed(device)
        if model is not None:  # an already loaded LoadedModel (compare reuses one model for many settings)
            loaded, base = model, None
        else:
            from simba_cli.models.loading import DTYPES
            from simba_cli.simba.artifact import load_any

            if dtype not in DTYPES:
                raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            loaded, base = load_any(str(pretrained), device=self._device, dtype=DTYPES[dtype], tokenizer=tokenizer)
        if loaded.tokenizer is None:
            raise UserError(f"{pretrained} has no tokenizer; pass tokenizer=DIR")
        self.loaded = loaded
        self.model = loaded.model.to(self._device).eval()
        self.tokenizer = loaded.tokenizer
        given = {k: v for k, v in prune_args.items() if k in _PRUNE_KEYS}
        if given.get("schedule") == "none":
            start = DENSE
        elif base is not None:
            start = base  # the artifact's own schedule, unless overridden below
        else:
            start = PruneConfig() if given else DENSE  # any pruning argument means linear unless said otherwise
        self.config = dataclasses.replace(start, **{k: _cast(k, v) for k, v in given.items()})
        self.batch_size_per_gpu = _as_int(batch_size if batch_size != "auto" else 8, "batch_size")
        if self.batch_size_per_gpu < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        self._max_length = _as_int(max_length, "max_length")
        self.flops: FlopsCount | None = None
        self.forwards = 0
        if KEEP_INSTANCES:
            INSTANCES.append(self)

    def _init_distributed(self, device):
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            self._device = self.accelerator.device
        else:
            self._device = resolve_device(device, fall_back=True)

    # --- what lm-eval asks of a model -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "simba")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def all_gather(self, tensor):
        return tensor if self.world_size <= 1 else self.accelerator.gather(tensor)

    def gather_object(self, obj, dst=0):
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=result, dst=dst)
        return result

    def barrier(self):
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    # --- scoring ----------------------------------------------------------------------------------------
    def _count(self, flops: FlopsCount):
        self.flops = flops if self.flops is None else self.flops + flops
        self.forwards += 1

    def measured(self) -> dict:
        """What really ran: FLOPs (total, per request token) and tokens per layer over all forwards."""
        if self.flops is None:
            return {"forwards": 0}
        f = self.flops
        return {"forwards": self.forwards, "flops": f.total, "flops_per_input_token": f.total / max(1, f.input_tokens),
                "input_tokens": f.input_tokens, "head_positions": f.head_positions,
                "keep_ratios": [round(r, 5) for r in f.keep_ratios], "tokens_per_layer": f.tokens_in,
                "mean_keep": sum(f.keep_ratios) / len(f.keep_ratios)}

    @torch.no_grad()
    def _score(self, batch: list[tuple[list[int], list[int]]], mode: str) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given its context, and whether it is greedy."""
        inputs, n_cont, targets = [], [], []
        for ctx, cont in batch:
            whole = (ctx + cont)[-(self.max_length + 1):]
            k = min(len(cont), len(whole) - 1)  # a continuation longer than the window is cut like `hf` does
            inputs.append(whole[:-1])
            n_cont.append(k)
            targets.append(whole[-k:])
        lengths = torch.tensor([len(x) for x in inputs], device=self.device)
        L = int(lengths.max())
        ids = torch.zeros(len(inputs), L, dtype=torch.long, device=self.device)
        protected = torch.zeros(len(inputs), L, dtype=torch.bool, device=self.device)
        for i, (x, k) in enumerate(zip(inputs, n_cont)):
            ids[i, :len(x)] = torch.tensor(x)
            protected[i, len(x) - k:len(x)] = True
        config = dataclasses.replace(self.config, mode=mode)
        out = pruned_forward(self.model, ids, config, lengths, protected=protected if mode == "protect" else None)
        self._count(out.flops)
        results = []
        for i, (x, k) in enumerate(zip(inputs, n_cont)):
            rows = (out.positions[i] >= len(x) - k) & (out.positions[i] < len(x)) & out.valid[i]
            logp = F.log_softmax(out.logits[i][rows].float(), dim=-1)  # (k, V), in position order
            target = torch.tensor(targets[i], device=self.device)
            picked = logp.gather(1, target[:, None]).squeeze(1)
            results.append((float(picked.sum()), bool((logp.argmax(-1) == target).all())))
        return results

    def _run_batches(self, requests: list, mode: str) -> list[tuple[float, bool]]:
        # Longest first, so each batch pads little; answers go back in the requests' order.
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        answers: list = [None] * len(requests)
        for s in range(0, len(order), self.batch_size):
            chunk = order[s:s + self.batch_size]
            scored = self._score([(requests[i][1], requests[i][2]) for i in chunk], mode)
            for i, answer in zip(chunk, scored):
                answers[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return answers

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return self._run_batches(requests, "protect")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, self._run_batches(windows, "exit")):
            totals[r] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    @torch.no_grad()
    def generate_text(self, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0) -> str:
        from simba_cli.models.decode import generate, prefill

        ids = self.tok_encode(prompt)
        if not ids:
            raise UserError("the prompt is empty; give some text with --prompt")
        prefill_fn = prefill if self.config.schedule == "none" else pruned_prefill(self.config)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        new = generate(self.model, torch.tensor([ids], device=self.device), max_new_tokens, prefill_fn=prefill_fn,
                       eos_token_id=self.eot_token_id, temperature=temperature, top_p=top_p, generator=gen)
        return self.tok_decode(new[0].tolist())

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from simba_cli.models.decode import generate, prefill

        prefill_fn = prefill if self.config.schedule == "none" else pruned_prefill(self.config)
        outputs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            new = generate(self.model, torch.tensor([ids], device=self.device), max_new, prefill_fn=prefill_fn,
                           eos_token_id=self.eot_token_id, temperature=temperature)
            self._count(generation_flops(self.model.cfg, self.config, len(ids), new.shape[1]))
            text = self.tok_decode(new[0].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs


def generation_flops(cfg, config: PruneConfig, prompt_tokens: int, new_tokens: int) -> FlopsCount:
    """FLOPs of one generation: the (pruned) prefill of the prompt with logits at its last token, exactly as
    `pruned_forward` counts a single sequence, then one dense recurrent step per further token. The decode
    steps add to every layer and the head; the keep ratios stay those of the prompt."""
    ratios = None if config.schedule == "none" else config.keep_ratios(cfg.n_layer)
    count = analytic(cfg, prompt_tokens, ratios, config.criterion, head_positions=1)
    steps = max(0, new_tokens - 1)  # the prefill's logits give the first new token
    count.layer = [f + count_layer(cfg, steps) for f in count.layer]
    count.head += count_head(cfg, steps)
    count.head_positions += steps
    return count


def _cast(key: str, value):
    kinds = {"final_keep": float, "first_layer": int, "stages": int, "seed": int, "schedule": str, "criterion": str}
    try:
        return kinds[key](value)
    except (TypeError, ValueError):
        raise UserError(f"{key} must be a {kinds[key].__name__}, got {value!r}") from None
