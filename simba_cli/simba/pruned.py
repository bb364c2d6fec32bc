"""The Simba-pruned forward: blocks run on shrinking, gathered sequences.

Layer l runs on its current tokens, scores them from its own scan quantities, and keeps the top
k_{l+1} = ceil(r_{l+1} L) of them, in their original order, for layer l + 1. A token dropped after
layer l is gone from every layer above; it "exits": its final hidden state is its residual stream
(hidden + residual) at that moment, read by the final norm and the LM head like any other.

Never dropped: each sequence's last real token, and the caller's `protected` positions (scored
continuations, the last k tokens of a perplexity window). When they outnumber a layer's budget, they
win, and the reported tokens per layer say so.

    mode "exit":    logits at every real position (training loss, full perplexity)
    mode "protect": logits only at protected positions (and each sequence's last token)

Batches are right-padded with `lengths`; every sequence keeps its own budget, gathered tensors are
padded to the longest, and padding never enters a ranking.

Any family's LM runs here (Mamba-1, Falcon-Mamba, Mamba-2): the blocks share one interface
(`models.mamba.BlockLM`), the criteria dispatch on the scan inputs a layer reports, the FLOPs on the config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from simba_cli.errors import UserError
from simba_cli.models.decode import DecodeState
from simba_cli.models.mamba import BlockLM
from simba_cli.models.mamba2_config import Mamba2Config
from simba_cli.simba.criteria import LayerView, needs_scan, score, sequence_seeds
from simba_cli.simba.criteria_beyond import passes_run
from simba_cli.simba.flops import FlopsCount, count_criterion, count_head, count_layer
from simba_cli.simba.settings import DENSE, PruneConfig


@dataclass
class PrunedOutput:
    logits: torch.Tensor  # (b, P, V)
    positions: torch.Tensor  # (b, P) original position of each row of logits
    valid: torch.Tensor  # (b, P) False on padding rows
    tokens_per_layer: torch.Tensor  # (n_layer, b) tokens entering each layer
    flops: FlopsCount  # measured from the tokens each layer processed
    kept: list[torch.Tensor] | None = None  # with trace=True: per layer, (b, l_i) positions, -1 on padding
    state: DecodeState | None = None  # with final_state=True: each layer's state after its last token


def budgets(ratios: list[float], lengths: torch.Tensor, n_protected: torch.Tensor) -> list[torch.Tensor]:
    """Tokens entering each layer per sequence: ceil(r_l L_b), at least the protected ones, at most L_b."""
    out = []
    for r in ratios:
        k = torch.ceil(lengths.double() * r - 1e-9).long()
        out.append(torch.minimum(torch.maximum(k, n_protected), lengths))
    return out


def select(scores: torch.Tensor, lengths: torch.Tensor, keep: torch.Tensor, protected: torch.Tensor):
    """Indices (b, max keep) of the tokens to keep, in original order, and the new lengths.

    Protected tokens always win; padding never does; between equal scores the later token wins (so a
    sequence keeps the same tokens in any batch: `topk` breaks ties by its own order, which depends on the
    padded width; and the ties that occur, far tokens whose decayed scores reach 0, order nearer first in
    exact arithmetic). Rows of shorter sequences are padded with index 0, which lies past their new length and
    is never read as a real token.
    """
    b, l = scores.shape
    valid = torch.arange(l, device=scores.device)[None, :] < lengths[:, None]
    # a NaN score ranks last among real tokens (with a real -inf), above padding
    lowest = torch.finfo(torch.float32).min
    s = torch.nan_to_num(scores.float(), nan=lowest, neginf=lowest).masked_fill(~valid, float("-inf"))
    s = s.masked_fill(protected & valid, float("inf"))
    k_max = int(keep.max())
    top = l - 1 - s.flip(1).sort(dim=1, descending=True, stable=True).indices[:, :k_max]  # later first on ties
    chosen = torch.arange(k_max, device=s.device)[None, :] < keep[:, None]
    idx = torch.where(chosen, top, torch.full_like(top, l)).sort(dim=1).values
    return torch.where(idx == l, torch.zeros_like(idx), idx), keep


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return torch.gather(x, 1, idx)
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _write_streams(exit_stream, stream, positions, lengths):
    """exit_stream[b, positions[b, j]] = stream[b, j] for real tokens j; padding goes to the spare row."""
    L = exit_stream.shape[1] - 1
    valid = torch.arange(stream.shape[1], device=stream.device)[None, :] < lengths[:, None]
    target = torch.where(valid, positions, L)
    exit_stream.scatter_(1, target[..., None].expand_as(stream), stream.to(exit_stream.dtype))


def pruned_forward(model: BlockLM, input_ids: torch.Tensor, config: PruneConfig = DENSE, lengths=None,
                   protected=None, final_state: bool = False, trace: bool = False) -> PrunedOutput:
    """Forward of `model` with Simba pruning: input_ids (b, L), right-padded to `lengths` (b,).

    protected: (b, L) bool, positions never pruned (and, in protect mode, the ones that get logits).
    """
    cfg = model.cfg
    b, L = input_ids.shape
    device = input_ids.device
    lengths = torch.full((b,), L, device=device) if lengths is None else lengths.to(device).long()
    if int(lengths.min()) < 1:
        raise UserError("every sequence needs at least one token")
    pos_grid = torch.arange(L, device=device)[None, :]
    real = pos_grid < lengths[:, None]
    prot = torch.zeros(b, L, dtype=torch.bool, device=device) if protected is None else protected.to(device).bool()
    prot = prot & real
    caller_protected = prot.any(1)  # (simba-window reads these positions' outputs where there are any)
    prot = prot | (pos_grid == lengths[:, None] - 1)
    ratios = config.keep_ratios(cfg.n_layer)
    keep = budgets(ratios, lengths, prot.sum(1))
    scan_needed = needs_scan(config.criterion)
    row_seeds = sequence_seeds(input_ids, lengths) if config.criterion == "random" else None

    hidden, residual = model.embed(input_ids), None
    positions = pos_grid.expand(b, L)
    cur_len = lengths
    exit_stream = None  # (b, L, d) streams of exited tokens, made on the first exit
    if bool((keep[0] < lengths).any()):  # truncate: even layer 0 reads only the last tokens (and protected)
        idx, cur_len = select(positions.float(), lengths, keep[0], prot)
        if config.mode == "exit":  # a token never read exits with its embedding
            exit_stream = torch.zeros(b, L + 1, cfg.d_model, dtype=torch.float32 if cfg.residual_in_fp32
                                      else hidden.dtype, device=device)
            _write_streams(exit_stream, hidden, positions, lengths)
        hidden, positions, prot = _gather(hidden, idx), _gather(positions, idx), _gather(prot, idx)
    tokens_in, layer_flops, crit_flops = [], [], []
    kept_trace, conv_states, ssm_states = [], [], []
    for i, block in enumerate(model.layers):
        prune_here = i + 1 < cfg.n_layer and bool((keep[i + 1] < cur_len).any())
        out, residual = block(hidden, residual, cur_len, keep_scan_inputs=prune_here and scan_needed,
                              final_state=final_state)
        hidden = out.out
        n_tokens = int(cur_len.sum())
        tokens_in.append(n_tokens)
        layer_flops.append(count_layer(cfg, n_tokens))
        crit_flops.append(0)
        if trace:
            kept_trace.append(torch.where(pos_grid[:, :positions.shape[1]] < cur_len[:, None], positions, -1))
        if final_state:
            conv_states.append(out.conv_state)
            ssm_states.append(out.ssm_state.float())
        if not prune_here:
            continue
        view = LayerView(out.scan, hidden, cur_len, keep[i + 1], i, config.seed, row_seeds, prot, caller_protected)
        scores = score(config.criterion, view)
        passes = passes_run(config.criterion, cur_len, prot, caller_protected, isinstance(cfg, Mamba2Config))
        crit_flops[-1] = count_criterion(cfg, config.criterion, n_tokens, passes)
        idx, new_len = select(scores, cur_len, keep[i + 1], prot)
        if config.mode == "exit":
            if exit_stream is None:  # one spare row at index L takes the writes of padding slots
                exit_stream = torch.zeros(b, L + 1, cfg.d_model, dtype=residual.dtype, device=device)
            # Write every current token's stream now; the survivors' rows are overwritten later.
            _write_streams(exit_stream, hidden + residual, positions, cur_len)
        hidden, residual = _gather(hidden, idx), _gather(residual, idx)
        positions, prot = _gather(positions, idx), _gather(prot, idx)
        cur_len = new_len
    stream = hidden + residual
    cur_valid = pos_grid[:, :stream.shape[1]] < cur_len[:, None]

    if config.mode == "exit":
        if exit_stream is None:  # nothing was pruned: the dense computation, bit for bit
            final = stream
        else:
            _write_streams(exit_stream, stream, positions, cur_len)
            final = exit_stream[:, :L]
        logits = model.logits_from_stream(final)
        out_pos, out_valid = pos_grid.expand(b, L), real
        head_positions = int(lengths.sum())
    else:
        want = prot & cur_valid
        n_out = want.sum(1)
        order = torch.sort((~want).long(), dim=1, stable=True).indices[:, :int(n_out.max())]
        rows = _gather(stream, order)
        logits = model.logits_from_stream(rows)
        out_pos = _gather(positions, order)
        out_valid = torch.arange(order.shape[1], device=device)[None, :] < n_out[:, None]
        head_positions = int(n_out.sum())
    flops = FlopsCount(tokens_in, layer_flops, crit_flops, count_head(cfg, head_positions), head_positions, b,
                       int(lengths.sum()))
    state = DecodeState(conv_states, ssm_states) if final_state else None
    return PrunedOutput(logits, out_pos, out_valid, torch.stack(keep), flops, kept_trace or None, state)


def pruned_prefill(config: PruneConfig, on_flops=None):
    """A prefill function for `models.decode.generate`: Simba-pruned prompt, then recurrent decoding;
    `on_flops(FlopsCount)` is told what the prefill's forward measured."""

    def prefill(model: BlockLM, input_ids, lengths=None):
        protect_mode = dataclasses.replace(config, mode="protect")
        out = pruned_forward(model, input_ids, protect_mode, lengths, final_state=True)
        if on_flops is not None:
            on_flops(out.flops)
        # In protect mode without a protected set, the only logits row is each sequence's last token.
        return out.logits[:, 0], out.state

    return prefill
