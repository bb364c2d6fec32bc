"""Token streams and batches for language-model training.

Documents are tokenized and concatenated, each followed by the end-of-text token. A training batch is
`batch_size` windows of seq_len + 1 tokens at random starts drawn from a seeded generator; its state is
part of every checkpoint, so a resumed run sees exactly the batches it would have seen. All processes
of a data-parallel run draw the same global batch and each takes its own rows.
"""

from __future__ import annotations

import torch

from simba_cli.errors import UserError


def tokenize_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


class BatchSampler:
    """Training batches: windows of the token stream at random starts, and, with a `RecallSampler`, a share
    of long-range recall documents in their place. Everything is drawn from one seeded generator, whose
    state (with the number of batches drawn, for the curriculum) is part of every checkpoint."""

    def __init__(self, stream: torch.Tensor, seq_len: int, batch_size: int, seed: int, recall=None):
        if stream.numel() < seq_len + 2:
            raise UserError(f"the training data has {stream.numel()} tokens, fewer than one window of "
                            f"data.seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len")
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.recall = recall  # a data.longrange.RecallSampler of seq_len + 1 tokens, or None
        self.draws = 0

    def next(self, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This process's rows of the next global batch, (rows // world, seq_len + 1), and which targets
        are recall answers, (rows // world, seq_len) bool (None without recall documents); rows is
        batch_size but in the recall mix's lead, whose rows are one document each (more of them, and
        shorter, while the documents are short)."""
        starts = torch.randint(0, self.stream.numel() - self.seq_len - 1, (self.batch_size,),
                               generator=self.generator)
        rows = [self.stream[s:s + self.seq_len + 1] for s in starts.tolist()]
        answers = None
        if self.recall is not None:
            import random

            mix = self.recall.mix
            chosen = torch.rand(self.batch_size, generator=self.generator) < mix.share
            leading = mix.leading(self.draws)
            n, length = (mix.lead_shape(self.draws, self.seq_len, self.batch_size) if leading
                         else (self.batch_size, self.seq_len))
            seeds = torch.randint(0, 2**62, (n,), generator=self.generator).tolist()
            reach = mix.reach_at(self.draws)
            rows += [None] * (n - len(rows))
            answers = torch.zeros(n, length, dtype=torch.bool)
            for i in range(n):
                if i % world != rank:  # only this process's rows are built
                    continue
                if leading:
                    rows[i], mask = self.recall.document(random.Random(seeds[i]), length=length + 1)
                    answers[i] = mask[1:]
                elif chosen[i]:
                    rows[i], mask = self.recall.row(random.Random(seeds[i]), reach)
                    answers[i] = mask[1:]
            answers = answers[rank::world]
        self.draws += 1
        return torch.stack(rows[rank::world]), answers

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "draws": self.draws}

    def load_state_dict(self, state: dict):
        self.generator.set_state(state["generator"])
        self.draws = state.get("draws", 0)


def eval_windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len + 1) from the start of the stream, about max_tokens in all."""
    n = min(max(1, max_tokens // seq_len), (stream.numel() - 1) // seq_len)
    if n < 1:
        raise UserError(f"the held-out data has {stream.numel()} tokens, fewer than one window of {seq_len + 1}")
    return torch.stack([stream[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
