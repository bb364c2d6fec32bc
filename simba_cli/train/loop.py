"""`finetune`: train a Mamba LM (Mamba-1 or Mamba-2) from scratch or continue one, optionally with Simba pruning active.

A run directory holds:
    recipe.yaml        the resolved recipe (the single source of truth of the run)
    run.json           versions, git commit, command, seed, device, world size, starting model
    train_log.jsonl    one line per logged step and per evaluation
    checkpoint.pt      the last complete training state (exact --resume)
    model/             the final model (Hugging Face format, tokenizer, metrics.json; simba.yaml if pruned)
    metrics.json       final metrics: held-out perplexity, time, tokens, FLOPs per token
    loss.png           training and held-out loss

Data parallel: run under `torchrun --nproc-per-node K simba finetune ...` (gloo on CPU, NCCL on CUDA);
the global batch is split across processes and only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from simba_cli.data.bpe import cached_bpe
from simba_cli.data.corpus import load_texts
from simba_cli.data.tokens import BatchSampler, eval_windows, tokenize_documents
from simba_cli.distributed import Dist
from simba_cli.distributed import setup as setup_distributed
from simba_cli.errors import Interrupted, UserError
from simba_cli.models.checkpoint import save_checkpoint
from simba_cli.models.config import MambaConfig
from simba_cli.models.loading import resolve_device
from simba_cli.models.mamba import BlockLM, MambaLM
from simba_cli.models.mamba2 import Mamba2Config, Mamba2LM
from simba_cli.outdir import write_atomic
from simba_cli.provenance import provenance
from simba_cli.simba.flops import dense_flops_per_token
from simba_cli.train import checkpoint as ckpt
from simba_cli.train.recipe import ModelSpec, Recipe, load_recipe


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup, then cosine from lr to min_lr at the last step."""
    o, total = recipe.optim, recipe.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: BlockLM, recipe: Recipe) -> torch.optim.Optimizer:
    # Weight decay on matrices only; never on A_log, D, biases or norms (as mamba-ssm).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.endswith("A_log") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.optim.lr, betas=recipe.optim.betas)


# Data parallel: process r draws its dropout masks from seed + PROCESS_SEED_STRIDE * r, so no two processes share them
PROCESS_SEED_STRIDE = 7919


class LossFn:
    """Next-token loss of a batch (b, seq_len + 1): dense, or through the Simba-pruned forward."""

    def __init__(self, recipe: Recipe, world: int = 1):
        self.prune, self.protect_last = recipe.prune, recipe.train.protect_last
        self.world = world  # data parallel: the parts' means are over every process's tokens (see _split_ce)
        self.answer_ce = None  # this batch's mean loss on recall answers (for the log; None without answers)

    def __call__(self, model, batch: torch.Tensor, answers: torch.Tensor | None = None,
                 parts: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, int]:
        """(loss, targets counted). `answers` (b, seq_len) bool marks the recall answers among the targets;
        with it, the loss is parts[0] * mean over the other targets + parts[1] * mean over the answers."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        if self.prune is None:
            logits = model(inputs)
            return self._split_ce(logits, targets, answers, parts), targets.numel()
        from simba_cli.simba.pruned import pruned_forward

        out = pruned_forward(model, inputs, self.prune, protected=self.protected(inputs))
        # out.logits (b, P, V) at out.positions (b, P)
        tgt = torch.gather(targets, 1, out.positions)
        picked = None if answers is None else torch.gather(answers, 1, out.positions)
        return self._split_ce(out.logits, tgt, picked, parts), tgt.numel()

    def protected(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """In protect mode, the last protect_last positions of each row: the loss is on them, none is pruned."""
        if self.prune.mode != "protect":
            return None
        protected = torch.zeros_like(inputs, dtype=torch.bool)
        protected[:, -self.protect_last:] = True
        return protected

    def _split_ce(self, logits: torch.Tensor, targets: torch.Tensor, answers: torch.Tensor | None,
                  parts: tuple[float, float]) -> torch.Tensor:
        if answers is None:
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        is_answer = answers.flatten()
        chosen_parts = (~is_answer, is_answer)
        counts = torch.stack([c.sum() for c in chosen_parts]).float()
        if self.world > 1:  # each part's mean over every process's tokens, as one process over the whole batch
            import torch.distributed as dist

            dist.all_reduce(counts)  # DDP then averages the gradients over the processes: hence the world below
        loss = ce.sum() * 0.0  # keeps the graph when a part is empty (a process whose rows hold no answers)
        for weight, chosen, count in zip(parts, chosen_parts, counts.tolist()):
            if weight and count > 0:
                loss = loss + weight * ce[chosen].sum() * (self.world / count)
        # this step's answers' mean loss, None on a step without answers (not the last step's that had some)
        self.answer_ce = float(ce[is_answer].detach().mean()) if bool(is_answer.any()) else None
        return loss


class Objective(torch.nn.Module):
    """The training loss as a module, so that DistributedDataParallel wraps the whole computation, the
    pruned forward included, and synchronises its gradients."""

    def __init__(self, model: BlockLM, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: torch.Tensor, answers: torch.Tensor | None = None,
                parts: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        return self.loss_fn(self.model, batch, answers, parts)[0]


@torch.no_grad()
def add_dropout(model: BlockLM, p: float) -> list:
    """Dropout on the embeddings and on every mixer's output, in train mode only (GPT-2's embedding and
    residual dropout). The zoo models see their small corpus several times over; this regularises them.
    Forward hooks, so the architecture and the saved model stay plain Mamba. Returns the hook handles."""
    if p <= 0:
        return []

    def hook(module, args, output):
        return F.dropout(output, p, training=module.training)

    modules = [model.backbone.embedding, *(block.mixer.out_proj for block in model.layers)]
    return [m.register_forward_hook(hook) for m in modules]


def held_out_recall(model, sets: dict[str, list], device) -> dict[str, float]:
    """Greedy recall accuracy (whole answers) on each held-out set of recall documents."""
    from simba_cli.data.longrange import recall_accuracy

    was_training = model.training
    model.eval()
    out = {f"{kind}_acc": recall_accuracy(model, docs, device)["recall_acc"] for kind, docs in sets.items()}
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_loss(model, windows: torch.Tensor, loss_fn: LossFn, batch_size: int, device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i:i + batch_size].to(device)
        loss, n = loss_fn(model, batch)
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / max(1, count)


def _start_model(recipe: Recipe, init_from: str | None, device):
    """(model, tokenizer, prune_from_artifact) for a run: a given model, or a new one from the recipe."""
    if init_from and recipe.model is not None:  # the run record would describe a model that was not trained
        raise UserError(f"recipe {recipe.name!r} has a model section (a model to train from scratch) and a MODEL to "
                        f"continue was given too; drop the recipe's model section, or the MODEL argument")
    if init_from:
        from simba_cli.simba.artifact import load_any

        loaded, prune = load_any(init_from, device=device)
        return loaded.model.train(), loaded.tokenizer, prune
    if recipe.model is None:
        raise UserError(f"recipe {recipe.name!r} has no model section: give a MODEL to continue, or add "
                        f"model: {{d_model: ..., n_layer: ...}} to train from scratch")
    docs = load_texts(recipe.data.source, "train", recipe.data.text_field)
    tokenizer = cached_bpe(docs, recipe.tokenizer.vocab_size)
    vocab = len(tokenizer)
    vocab += (-vocab) % 8  # pad like mamba-ssm
    model = new_model(recipe.model, vocab)
    model.reset_parameters(seed=recipe.train.seed)
    return model.to(device).train(), tokenizer, None


def new_model(spec: ModelSpec, vocab_size: int) -> BlockLM:
    """The recipe's architecture, uninitialised: a MambaLM, or a Mamba2LM for `family: mamba2` (embeddings tied
    to the LM head in both)."""
    shared = dict(d_model=spec.d_model, n_layer=spec.n_layer, vocab_size=vocab_size, d_state=spec.d_state,
                  expand=spec.expand, d_conv=spec.d_conv, tie_embeddings=True)
    if spec.family == "mamba2":
        return Mamba2LM(Mamba2Config(**shared, head_dim=spec.head_dim, n_groups=spec.n_groups,
                                     chunk_size=spec.chunk_size))
    return MambaLM(MambaConfig(**shared), init=False)


@dataclass
class Run:
    """What `setup` prepared for one training run: everything checked, nothing written yet."""

    recipe: Recipe
    out: Path
    device: torch.device
    dd: Dist
    model: BlockLM
    tokenizer: object
    loss_fn: LossFn
    train_stream: torch.Tensor
    val_windows: torch.Tensor
    val_recall: dict[str, list]  # kind -> held-out recall documents (from validation text)
    init_from: str | None
    resuming: bool  # --resume with a checkpoint to continue from


@dataclass
class TrainState:
    """Where training stands: what a checkpoint saves beside the model, optimizer and sampler."""

    step: int = 0
    elapsed: float = 0.0
    tokens_seen: int = 0
    loss: float = float("nan")
    checkpoint_step: int | None = None


def setup(recipe: Recipe, out: Path, init_from: str | None, resume: bool, overwrite: bool,
          device: str | None) -> Run:
    """Check everything that can fail on bad input (the recipe, the data, the model, --out) and build the
    model and data; --out is not touched (an --overwrite deletes the old run only in `prepare_out`)."""
    from simba_cli.outdir import check_out

    device = resolve_device(device)
    dd, device = setup_distributed(device)  # under torchrun: cuda:LOCAL_RANK on CUDA
    if recipe.train.batch_size % dd.world:
        raise UserError(f"train.batch_size {recipe.train.batch_size} is not divisible by {dd.world} processes")
    resumable = check_out(out, "recipe.yaml", "finetune", overwrite=overwrite, resume=resume)
    torch.manual_seed(recipe.train.seed)
    model, tokenizer, artifact_prune = _start_model(recipe, init_from, device)
    if dd.world > 1:  # the same model on every process (above), then dropout masks of each process's own
        torch.manual_seed(recipe.train.seed + PROCESS_SEED_STRIDE * dd.rank)
    if artifact_prune is not None and recipe.prune is None:
        recipe.prune = dataclasses.replace(artifact_prune, mode="exit")  # the loss on every position
    if recipe.prune is not None:  # the schedule against this model's layers, before --out is touched
        from simba_cli.simba.settings import check_seq_len

        if recipe.prune.mode == "protect":  # the loss's positions are never pruned: some others must be left
            mix = recipe.data.recall  # the lead's rows are single documents, of data.recall.shortest at first
            lead = mix is not None and mix.lead_steps > 0
            shortest = min(recipe.data.seq_len, mix.shortest) if lead else recipe.data.seq_len
            if recipe.train.protect_last >= shortest:
                where = "data.seq_len, data.recall.shortest: the lead's rows" if lead else "data.seq_len"
                raise UserError(f"train.protect_last {recipe.train.protect_last} protects every position of the "
                                f"shortest rows ({shortest} tokens: {where}), so nothing would be pruned; lower it")
        check_seq_len(recipe.prune, model.cfg.n_layer, recipe.data.seq_len)
    train_stream = tokenize_documents(tokenizer, load_texts(recipe.data.source, "train", recipe.data.text_field))
    val_docs = load_texts(recipe.data.source, "validation", recipe.data.text_field)
    val_windows = eval_windows(tokenize_documents(tokenizer, val_docs), recipe.data.seq_len, recipe.data.val_tokens)
    val_recall = {}
    if recipe.data.recall is not None:
        from simba_cli.data.longrange import RecallSampler

        # held-out recall on validation text: whole rows, and short documents (where retrieval appears first)
        val_stream = tokenize_documents(tokenizer, val_docs)
        mix, k = recipe.data.recall, max(recipe.data.recall.pairs)
        whole = RecallSampler(tokenizer, val_stream, recipe.data.seq_len + 1, mix)
        short = RecallSampler(tokenizer, val_stream, min(recipe.data.seq_len + 1, 4 * mix.shortest), mix)
        # training builds documents of `shortest` tokens: one that cannot hold a fact fails here, not mid-run
        shortest = RecallSampler(tokenizer, val_stream, min(recipe.data.seq_len + 1, mix.shortest), mix)
        try:
            val_recall = {"passkey": whole.fixed("passkey", 32, seed=1),
                          "mqar": whole.fixed("mqar", 32, seed=2, pairs=k),
                          "passkey_short": short.fixed("passkey", 32, seed=3),
                          "mqar_short": short.fixed("mqar", 32, seed=4, pairs=min(k, 4))}
            for kind in ("passkey", "mqar"):
                shortest.fixed(kind, 1, seed=0, pairs=1)
        except ValueError:
            raise UserError(f"recall documents of {shortest.length} tokens cannot hold one fact and its question; "
                            f"raise data.recall.shortest (and data.seq_len)") from None
    resuming = resumable and (out / ckpt.CHECKPOINT).is_file()
    if resuming and load_recipe(out / "recipe.yaml").to_dict() != recipe.to_dict():
        raise UserError(f"--resume with a recipe that differs from {out}/recipe.yaml; resume with that recipe")
    return Run(recipe, out, device, dd, model, tokenizer, LossFn(recipe, dd.world), train_stream, val_windows,
               val_recall, init_from, resuming)


def prepare_out(run: Run):
    """A new run: --out emptied (an --overwrite, or a --resume before the first checkpoint) and the recipe and
    provenance written. A resumed run: its provenance added to run.json's `resumes`."""
    from simba_cli.outdir import replace

    if not run.dd.main:
        return
    if run.resuming:  # the run record keeps the first session's provenance and lists every resumption's
        record = run.out / "run.json"
        info = json.loads(record.read_text()) if record.is_file() else {}
        info.setdefault("resumes", []).append(provenance(device=str(run.device), world_size=run.dd.world))
        write_atomic(record, json.dumps(info, indent=2) + "\n")
        return
    replace(run.out)
    recipe, model = run.recipe, run.model
    write_atomic(run.out / "recipe.yaml", recipe.to_yaml())
    info = provenance(seed=recipe.train.seed, device=str(run.device), world_size=run.dd.world,
                      init_from=run.init_from, parameters=model.num_parameters(), model_config=model.cfg.to_dict(),
                      train_tokens=run.train_stream.numel(), val_tokens=int(run.val_windows[:, 1:].numel()))
    write_atomic(run.out / "run.json", json.dumps(info, indent=2) + "\n")


def train(run: Run, progress: bool = True) -> TrainState:
    """The training loop, from the checkpoint when resuming: log, held-out evaluations, checkpoints."""
    recipe, model, device, dd, out = run.recipe, run.model, run.device, run.dd, run.out
    add_dropout(model, recipe.train.dropout)
    recall = None
    if recipe.data.recall is not None:
        from simba_cli.data.longrange import RecallSampler

        recall = RecallSampler(run.tokenizer, run.train_stream, recipe.data.seq_len + 1, recipe.data.recall)
    sampler = BatchSampler(run.train_stream, recipe.data.seq_len, recipe.train.batch_size, recipe.train.seed,
                           recall)
    optimizer = _optimizer(model, recipe)
    at = TrainState()
    if run.resuming:
        state = ckpt.load(out)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        _restore_rng(state, dd, device, recipe.train.seed)
        at = TrainState(state["step"], state["elapsed"], state["tokens_seen"], state.get("loss", float("nan")),
                        checkpoint_step=state["step"])
        if dd.main:
            _truncate_log(out / "train_log.jsonl", at.step)
    objective = Objective(model, run.loss_fn)
    if dd.world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(objective)
    use_bf16 = resolved_precision(recipe, device) == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext
    log = open(out / "train_log.jsonl", "a") if dd.main else None

    def write_log(record: dict):
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def checkpoint_now():
        cpu_rng, cuda_rng = _rng_states(dd, device)
        if dd.main:
            ckpt.save(out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "sampler": sampler.state_dict(), "rng": cpu_rng, "cuda_rng": cuda_rng,
                            "step": at.step, "elapsed": at.elapsed, "tokens_seen": at.tokens_seen,
                            "loss": at.loss})
        at.checkpoint_step = at.step

    from simba_cli.report.progress import Bar

    bar = Bar(progress and dd.main, recipe.train.steps, "train", ("loss {task.fields[loss]:.3f}",
              "{task.fields[rate]:,.0f} tok/s"), start=at.step, loss=float("nan"), rate=0.0)
    window_start, window_tokens = time.perf_counter(), 0
    try:
        with bar:
            while at.step < recipe.train.steps:
                t0 = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(at.step, recipe)
                parts = (1.0, 1.0)
                if recall is not None:  # the recall mix's lead trains the answers alone
                    mix = recall.mix
                    parts = (0.0, 1.0) if mix.leading(sampler.draws) else (1.0, mix.answer_loss)
                batch, answers = sampler.next(dd.rank, dd.world)
                with autocast():
                    loss = objective(batch.to(device), None if answers is None else answers.to(device), parts)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if recipe.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
                optimizer.step()
                at.step += 1
                tokens = (batch.shape[1] - 1) * batch.shape[0] * dd.world  # the lead's rows differ in number and length
                at.tokens_seen += tokens
                at.elapsed += time.perf_counter() - t0
                window_tokens += tokens
                at.loss = loss.item() if dd.world == 1 else _mean_over_processes(loss, dd.world)
                if at.step % recipe.train.log_every == 0 or at.step == recipe.train.steps:
                    rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                    answer = {} if recall is None else {"answer_loss": run.loss_fn.answer_ce}
                    write_log({"step": at.step, "loss": at.loss, **answer, "lr": lr_at(at.step - 1, recipe),
                               "tokens": at.tokens_seen, "tokens_per_s": rate, "elapsed_s": at.elapsed})
                    window_start, window_tokens = time.perf_counter(), 0
                    bar.update(completed=at.step, loss=at.loss, rate=rate)
                if at.step % recipe.train.eval_every == 0 or at.step == recipe.train.steps:
                    val = evaluate_loss(model, run.val_windows, run.loss_fn, recipe.train.batch_size, device)
                    held = held_out_recall(model, run.val_recall, device)
                    write_log({"step": at.step, "val_loss": val, "val_ppl": math.exp(val), **held,
                               "elapsed_s": at.elapsed})
                    bar.note(f"step {at.step}: held-out loss {val:.3f} (ppl {math.exp(val):.2f})"
                             + "".join(f", {k} {v:.2f}" for k, v in held.items()))
                if at.step % recipe.train.checkpoint_every == 0 or at.step == recipe.train.steps:
                    checkpoint_now()
    except KeyboardInterrupt:
        where = (f"the last checkpoint is step {at.checkpoint_step}" if at.checkpoint_step is not None
                 else "there is no checkpoint yet, so it starts again from step 0")
        raise Interrupted(f"interrupted at step {at.step}; {where}: continue with the same command and --resume "
                          f"(--out {out})") from None
    finally:
        if log:
            log.close()
    return at


def resolved_precision(recipe: Recipe, device: torch.device) -> str:
    """What train.precision means on this device: auto is bf16 autocast on CUDA, fp32 elsewhere."""
    if recipe.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return recipe.train.precision


def finish(run: Run, at: TrainState) -> dict:
    """Final held-out evaluation, the exported model, metrics.json (last: it marks a finished run), the plot."""
    recipe, model, out = run.recipe, run.model, run.out
    metrics = {}
    if run.dd.main:
        val = evaluate_loss(model, run.val_windows, run.loss_fn, recipe.train.batch_size, run.device)
        metrics = {
            "name": recipe.name, "parameters": model.num_parameters(),
            "flops_per_token": dense_flops_per_token(model.cfg), "steps": at.step, "tokens_seen": at.tokens_seen,
            "train_time_s": round(at.elapsed, 1), "final_train_loss": at.loss, "val_loss": val,
            "val_ppl": math.exp(val), "val_tokens": int(run.val_windows[:, 1:].numel()),
            # the tokens val_loss averages over: in protect mode the last protect_last of each window
            "val_scored_tokens": int(run.val_windows.shape[0] * min(recipe.train.protect_last,
                                                                     run.val_windows.shape[1] - 1))
            if recipe.prune is not None and recipe.prune.mode == "protect" else int(run.val_windows[:, 1:].numel()),
            "val_seq_len": recipe.data.seq_len, "pruned": recipe.prune is not None,
            "precision": resolved_precision(recipe, run.device),
            **held_out_recall(model, run.val_recall, run.device),
        }
        if run.val_recall:  # the recall accuracies are the dense model's, as the zoo cards report them
            metrics["recall_forward"] = "dense"
        if recipe.prune is not None:  # measured: a held-out window through the pruned forward, as training runs it
            from simba_cli.simba.pruned import pruned_forward

            window = run.val_windows[:1, :-1].to(run.device)
            model.eval()
            with torch.no_grad():
                count = pruned_forward(model, window, recipe.prune, protected=run.loss_fn.protected(window)).flops
            metrics.update(pruned_flops_per_token=count.total / window.shape[1], keep_ratios=count.keep_ratios)
        _export(model, run.tokenizer, recipe, out, metrics)
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        from simba_cli.report.plots import plot_training

        plot_training(out / "train_log.jsonl", out / "loss.png", title=recipe.name)
    if run.dd.world > 1:
        dist.barrier()
    return metrics


def finetune(recipe: Recipe | str | Path, out: str | Path, init_from: str | None = None, resume: bool = False,
             overwrite: bool = False, device: str | None = None, progress: bool = True) -> dict:
    """Train per `recipe` into the run directory `out` (setup, prepare_out, train, finish); returns the final
    metrics. --resume continues from the last checkpoint, or starts a run that had none yet again; a finished
    run it leaves as it is and returns its metrics."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    run = setup(recipe, Path(out), init_from, resume, overwrite, device)
    if run.resuming and (run.out / "metrics.json").is_file():  # finished (metrics.json is written last): as it is
        return json.loads((run.out / "metrics.json").read_text())
    prepare_out(run)
    return finish(run, train(run, progress))


def _rng_states(dd: Dist, device) -> tuple:
    """(CPU, CUDA or None) random states for a checkpoint: one process's, or a list with every process's (their
    dropout masks differ, on the CPU and on the GPU)."""
    cpu = dd.all_gather(torch.get_rng_state())
    cuda = dd.all_gather(torch.cuda.get_rng_state(device).cpu()) if device.type == "cuda" else None
    if dd.world == 1:
        return cpu[0], None if cuda is None else cuda[0]
    return cpu, cuda


def _restore_rng(state: dict, dd: Dist, device, seed: int):
    """This process's random states from a checkpoint. Resumed with another number of processes than wrote it,
    each process seeds masks of its own instead."""
    def mine(saved):
        return saved[dd.rank] if isinstance(saved, list) and len(saved) == dd.world else \
            saved[0] if isinstance(saved, list) else saved

    torch.set_rng_state(mine(state["rng"]))
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(mine(state["cuda_rng"]), device)
    if dd.world > 1 and not (isinstance(state["rng"], list) and len(state["rng"]) == dd.world):
        torch.manual_seed(seed + PROCESS_SEED_STRIDE * dd.rank + state["step"])


def _mean_over_processes(loss: torch.Tensor, world: int) -> float:
    """The step's loss over every process's rows (what the log and the bar show), as one process would report it."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / world


def _truncate_log(path: Path, step: int):
    """Drop the records written after the checkpoint a run resumes from: they are about to be redone. A line
    cut short by a kill (the log is appended as training goes) is one of them."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


def _export(model, tokenizer, recipe: Recipe, out: Path, metrics: dict):
    """out/model: the weights, tokenizer, recipe, metrics, training log and (pruned) simba.yaml, all written into
    a temporary directory that becomes out/model when complete."""
    extra = {"recipe.yaml": recipe.to_yaml(), "metrics.json": json.dumps(metrics, indent=2) + "\n"}
    if (out / "train_log.jsonl").is_file():
        extra["train_log.jsonl"] = (out / "train_log.jsonl").read_text()
    if recipe.prune is not None:
        from simba_cli.simba.artifact import FILENAME, artifact_text

        extra[FILENAME] = artifact_text(".", recipe.prune, model.cfg, recipe.data.seq_len, seed=recipe.train.seed)
    save_checkpoint(model, out / "model", fmt="hf", tokenizer=tokenizer, extra_files=extra, overwrite=True)
