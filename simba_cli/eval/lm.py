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
default; explicit schedule arguments override it). The model itself, its prune settings and the FLOPs
count live in a `simba.runner.ModelRunner`; this class only speaks lm-eval's interface. The FLOPs of
every forward are counted from the tokens each layer really processed (`measured()`).

max_length (the longest input scored at once) is resolved as lm-eval's `hf` model resolves it, so both
score long documents the same way: an explicit max_length; else the tokenizer's model_max_length unless
it is unset (the embedded zoo's tokenizer says 1,000,000: a recurrent model has no window); else 2048,
the training length of the official Mamba models.
Data parallel: under `torchrun` (or `accelerate launch`), every process builds every request, scores its
share (batch j of the one-process order on rank j % world) and receives everyone's answers, so lm-eval sees one
process on every rank (rank 0, world size 1) and computes the very results of a one-process run. The FLOPs
count holds every process's forwards (what ran in total, as one process would have run it). Why not lm-eval's
own split (an LM reporting rank and world size): it deals documents round-robin and gathers them rank by
rank, which reorders samples and bootstrap draws, and it pads ranks with repeated requests, which would run
and count extra forwards.
"""

from __future__ import annotations

import typing

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from simba_cli.distributed import setup
from simba_cli.errors import UserError
from simba_cli.models.loading import resolve_device
from simba_cli.simba.runner import ModelRunner
from simba_cli.simba.settings import PruneConfig
from simba_cli.typed import convert

_PRUNE_KEYS = ("schedule", "final_keep", "first_layer", "stages", "criterion", "seed")
_OTHER_KEYS = ("pretrained", "batch_size", "max_length", "device", "dtype", "tokenizer")
_IGNORED = ("max_batch_size", "trust_remote_code")  # lm-eval passes them to every model

# lm-eval's own CLI (simba_cli.lm_eval) keeps every SimbaLM it makes, to report what they ran; elsewhere
# nothing holds on to a model
KEEP_INSTANCES = False
INSTANCES: list = []


def _int(value, name: str) -> int:
    return convert(int, value, name, strings=True)


@register_model("simba")
class SimbaLM(TemplateLM):
    def __init__(self, pretrained: str = "zoo-m", batch_size=8, max_length=None, device: str | None = None,
                 dtype: str = "float32", tokenizer: str | None = None, runner: ModelRunner | None = None,
                 **prune_args):
        super().__init__()
        unknown = set(prune_args) - set(_PRUNE_KEYS) - set(_IGNORED)
        if unknown:
            raise UserError(f"unknown simba model arguments {sorted(unknown)}; known: "
                            f"{', '.join(_OTHER_KEYS + _PRUNE_KEYS)}")
        kinds = typing.get_type_hints(PruneConfig)
        given = {k: convert(kinds[k], v, k, strings=True) for k, v in prune_args.items() if k in _PRUNE_KEYS}
        # under torchrun: the process group, and this process's device (cuda:LOCAL_RANK)
        self.dist, device = setup(runner.device if runner else resolve_device(device, fall_back=True))
        # compare hands over a loaded runner, to reuse one model for many settings
        self.runner = runner or ModelRunner.load(str(pretrained), device, dtype, tokenizer, fall_back=True, **given)
        self.batch_size_per_gpu = _int(8 if batch_size == "auto" else batch_size, "batch_size")
        if self.batch_size_per_gpu < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}")
        self._max_length = None if max_length is None else _int(max_length, "max_length")
        if self._max_length is not None and self._max_length < 2:
            raise UserError(f"max_length must be at least 2 tokens, got {max_length}")
        if KEEP_INSTANCES:
            INSTANCES.append(self)

    @property
    def config(self) -> PruneConfig:
        return self.runner.config

    @config.setter
    def config(self, value: PruneConfig):
        self.runner.config = value

    @property
    def model(self):
        return self.runner.model

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    def measured(self) -> dict:
        return self.runner.measured()

    # --- what lm-eval asks of a model -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.runner.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length is not None:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length

        return resolve_max_length(None, self.tokenizer)  # Mamba configs name no maximum length

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.runner.device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "simba")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- scoring ----------------------------------------------------------------------------------------
    def _run_batches(self, requests: list, mode: str) -> list[tuple[float, bool]]:
        # Longest first, so each batch pads little; answers go back in the requests' order.
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        chunks = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        answers: list = [None] * len(requests)

        def score(chunk):
            return self.runner.loglikelihood([(requests[i][1], requests[i][2]) for i in chunk], mode, self.max_length)

        for chunk, scored in self._spread(chunks, score):
            for i, answer in zip(chunk, scored):
                answers[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            self._progress(len(chunk))
        return answers

    def _spread(self, items: list, fn):
        """(item, fn(item)) for every item, in order: under torchrun each process computes its share
        (`Dist.spread`) and the runner's FLOPs count takes in every process's forwards, so that every process
        holds the count of the whole run."""
        dd = self.dist
        if dd.world == 1:
            yield from ((item, fn(item)) for item in items)
            return
        runner = self.runner

        def counted(item):
            flops, forwards = runner.flops, runner.forwards
            value = fn(item)
            ran = (runner.flops if flops is None else runner.flops - flops), runner.forwards - forwards
            runner.flops, runner.forwards = flops, forwards  # added back below, with every other rank's
            return value, ran

        for item, (value, ran) in dd.spread(items, counted):
            runner.count(*ran)
            yield item, value

    def _progress(self, n: int):
        """Requests done, for a caller's progress bar (`on_progress`, set by `simba eval`)."""
        callback = getattr(self, "on_progress", None)
        if callback is not None:
            callback(n)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=True)  # progress is the caller's bar, not tqdm's

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

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import normalize_gen_kwargs

        def generate(req) -> str:
            context, kwargs = req.args
            # lm-eval's reading of the generation arguments, as its `hf` model: max_new_tokens and the other
            # names of max_gen_toks, sampling on when a temperature is given without do_sample
            kwargs = normalize_gen_kwargs(dict(kwargs or {}), 256)
            until = [u for u in kwargs["until"] if u] or [self.tok_decode([self.eot_token_id], False)]
            max_new = int(kwargs["max_gen_toks"])
            sample = bool(kwargs.get("do_sample"))
            temperature = float(kwargs.get("temperature") or 0.0) if sample else 0.0
            top_p, top_k = float(kwargs.get("top_p") or 1.0), int(kwargs.get("top_k") or 0)
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            # the end-of-text token ends a generation and is not part of its text (as lm-eval's `hf` model), and
            # so does a stop string, checked as the tokens come (no FLOPs spent past it)
            def seen(new: list[int]) -> bool:
                return any(u in self.tok_decode(new) for u in until)

            text = self.tok_decode(self.runner.generate_ids(ids, max_new, temperature, top_p, top_k=top_k, stop=seen))
            for stop in until:
                if stop in text:
                    text = text.split(stop)[0]
            return text

        outputs = []
        for req, text in self._spread(list(requests), generate):
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
            self._progress(1)
        return outputs
