"""Recurrent decoding: a prefill that returns each layer's conv and SSM state, one-token steps, generate.

The state of layer i is (conv_state, ssm_state): for Mamba-1 (b, D, d_conv) and (b, D, N), for Mamba-2
(b, D + 2 G N, d_conv) and (b, H, P, N). Each family's mixer reads and updates its own
(`mix(final_state=True)`, `step`), so this module runs either. A step costs O(1) in the context length.
The prefill may come from any forward that reports final states, dense here or Simba-pruned
(`simba.pruned`), since decoding only needs each layer's state after its last real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simba_cli.errors import UserError
from simba_cli.models.mamba import BlockLM


@dataclass
class DecodeState:
    conv: list[torch.Tensor]  # per layer (b, D, d_conv); Mamba-2 (b, D + 2 G N, d_conv)
    ssm: list[torch.Tensor]  # per layer (b, D, N); Mamba-2 (b, H, P, N); float32


@torch.no_grad()
def prefill(model: BlockLM, input_ids, lengths=None):
    """Dense prefill: logits at each sequence's last real token (b, V) and the decode state."""
    hidden, residual = model.embed(input_ids), None
    conv, ssm = [], []
    for block in model.layers:
        out, residual = block(hidden, residual, lengths, final_state=True)
        hidden = out.out
        conv.append(out.conv_state)
        ssm.append(out.ssm_state.float())
    last = _last_index(input_ids, lengths)
    stream = hidden + residual
    idx = last[:, None, None].expand(-1, 1, stream.shape[-1])
    logits = model.logits_from_stream(torch.gather(stream, 1, idx).squeeze(1))
    return logits, DecodeState(conv, ssm)


def _last_index(input_ids, lengths):
    b, l = input_ids.shape
    if lengths is None:
        return torch.full((b,), l - 1, device=input_ids.device)
    return lengths.to(input_ids.device) - 1


@torch.no_grad()
def step(model: BlockLM, token_ids, state: DecodeState):
    """One token per sequence: token_ids (b,) -> logits (b, V); the state is updated in place."""
    hidden, residual = model.embed(token_ids), None
    for i, block in enumerate(model.layers):
        normed, residual = block.norm_residual(hidden, residual)
        hidden = block.mixer.step(normed, state.conv[i], state.ssm[i])
    return model.head(hidden, residual)


@torch.no_grad()
def sample_next(logits, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None):
    """Greedy when temperature == 0, else sampling with optional top-k / top-p filtering. logits (b, V)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        # Drop a token once the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> None:
    """One-line errors for arguments `generate` cannot honour (NaN fails every comparison, so every check)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}; ask for one or more new tokens")
    if not temperature >= 0:
        raise UserError(f"temperature must be at least 0 (0 is greedy), got {temperature!r}; "
                        f"use 0 for greedy decoding or a positive value to sample")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"top_k must be an integer of at least 0, got {top_k!r}; use 0 for no top-k filtering")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p!r}; use 1 for no nucleus filtering")


@torch.no_grad()
def generate(model: BlockLM, input_ids, max_new_tokens: int, lengths=None, prefill_fn=prefill,
             eos_token_id: int | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             generator=None, stop=None):
    """Prefill (dense by default; pass a Simba-pruned `prefill_fn`), then recurrent decoding.

    Returns the new tokens (b, <= max_new_tokens); a sequence that emitted eos is padded with eos after it.
    stop(new tokens so far, (b, t)) -> bool: decoding ends after the step where it is true (a stop string seen).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    logits, state = prefill_fn(model, input_ids, lengths)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = []
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt)
        if eos_token_id is not None and bool(done.all()) or stop is not None and stop(torch.stack(out, dim=1)):
            break
        if len(out) == max_new_tokens:  # the last token needs no step: its logits would not be read
            break
        logits = step(model, nxt, state)
    return torch.stack(out, dim=1)
