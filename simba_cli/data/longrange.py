"""Long-range recall documents: facts stated once inside filler text, asked for at the end.

One format serves training and evaluation, so that a model trained on it knows what is asked:

    ... filler (play text) ...
    Remember: the sword is noble.          a fact, at some depth of the document
    ... filler ...
    Remember: the crown is gentle.
    ... filler ...
    Recall: the crown is gentle.           queries at the end, one per line
    Recall: the sword is noble.

    passkey   one fact, "the pass key is sorrow" (a made-up key, a noun): retrieval at a chosen depth
    mqar      K facts with one-token keys and values (the Zoology setting, in words), K queries

Keys and values are words that are single tokens of the embedded zoo's tokenizer, so every answer is
one token. (Five-digit pass keys, a six-token answer copied digit by digit, stayed at 0% exact match
within the zoo's training budget, while one-token retrieval emerged.) Training documents are assembled from token
pieces cut out of the training plays (`RecallSampler`); evaluation documents are text built from the
evaluation plays (`eval.tasks`). Neither reads the other's plays.

Keeping only the most recent tokens must lose a fact stated further back than the kept tokens reach:
with final_keep r at the last layer of a context of L tokens, `recent` keeps the last r L tokens there,
so a fact at depth d (0 = the start, 1 = just before the question) is beyond its reach in the top layer
when (1 - d) L > r L, i.e. when d < 1 - r.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

KEYS = tuple("""king queen duke lord lady prince knight father mother brother sister uncle cousin husband wife
child maid servant master fool villain devil crown sword ring gold horse house court field fire wind earth
heaven grave letter music oath deed name heart soul blood body head hand face tongue night light peace power
truth virtue honour fortune nature death life love grace faith""".split())
VALUES = tuple("""good fair true false sweet dead poor rich strong proud happy holy noble gentle strange cold
young wise kind foul dear free great high quick sick royal honest bloody little sure worthy""".split())
PASSKEY_VALUES = tuple("""arms breath business charge company country danger daughter dream enemy friend grief
ground home hope hour land matter mistress news people place purpose reason service shame sight sleep sorrow
spirit word youth""".split())
PASSKEY = "pass key"
KINDS = ("passkey", "mqar")


def fact_line(key: str, value: str) -> str:
    return f"\nRemember: the {key} is {value}.\n"


def query_prefix(key: str) -> str:
    return f"\nRecall: the {key} is"


def answer_text(value: str) -> str:
    return f" {value}."


def passkey_value(rng: random.Random) -> str:
    return rng.choice(PASSKEY_VALUES)


def draw_facts(kind: str, n_pairs: int, rng: random.Random) -> list[tuple[str, str]]:
    """The (key, value) facts of one document: one pass key, or n_pairs distinct keys with random values."""
    if kind == "passkey":
        return [(PASSKEY, passkey_value(rng))]
    return list(zip(rng.sample(KEYS, n_pairs), (rng.choice(VALUES) for _ in range(n_pairs))))


@dataclass
class RecallMix:
    """The synthetic share of a training batch (a recipe's data.recall section).

    share: the share of rows that are recall documents (the rest are play windows);
    kinds: relative weights of passkey and mqar documents; pairs: the K of mqar documents, drawn from
    this list;
    lead_steps: the first steps train retrieval alone: every row is one recall document and the loss is
    on its answers only. Retrieval emerges late and suddenly, and sooner when the answers carry the loss
    alone (recipes/probe-lead.yaml: a 2-layer model left chance at about step 700; with the other
    tokens' mean loss beside the answers', probe-no-lead.yaml, at about step 1700), and when each
    document has a row to itself (packed documents reuse the same keys with other values, and the
    probe did not leave chance in 2000 steps). While the documents are shorter than `lead_len`, a step
    takes lead_len // length of them for each of its batch_size rows: batch_size * lead_len tokens;
    curriculum_from, curriculum_steps: documents are `shortest` tokens until step curriculum_from, then
    grow to a whole row over curriculum_steps (facts placed ever further back), in the lead (one a row)
    or after it (several packed into one row while they are short);
    answer_loss: after the lead, the loss is the mean over every other token plus answer_loss
    times the mean over the answer tokens (so the answers' share does not shrink with the rows' length)."""

    share: float = 0.5
    passkey: float = 0.5
    mqar: float = 0.5
    pairs: tuple[int, ...] = (4, 8, 16)
    lead_steps: int = 0
    lead_len: int = 512
    curriculum_from: int = 0
    curriculum_steps: int = 0
    shortest: int = 96
    answer_loss: float = 1.0

    def leading(self, step: int) -> bool:
        """Whether training `step` (0-based) is in the lead: recall rows only, loss on answers only."""
        return step < self.lead_steps

    def reach_at(self, step: int) -> float:
        """The curriculum: the share of a row one document fills at a training step (0: `shortest`)."""
        steps = self.curriculum_steps
        return 1.0 if steps <= 0 else min(1.0, max(0, step - self.curriculum_from) / steps)

    def lead_shape(self, step: int, seq_len: int, batch_size: int) -> tuple[int, int]:
        """(rows, tokens a row) of the lead's batch at `step`: one document a row, of the curriculum's
        length, and as many rows as fill batch_size rows of lead_len tokens (a multiple of batch_size)."""
        size = min(seq_len, max(self.shortest, int(self.reach_at(step) * seq_len)))
        return batch_size * max(1, self.lead_len // size), size


class RecallSampler:
    """Recall documents of exactly `length` tokens, cut from a filler token stream (the training plays).

    Each document: facts at random depths (within the curriculum's reach), filler between, the queries at
    the end. Returns the tokens and a mask of the answer tokens (for the loss weight and the accuracy)."""

    def __init__(self, tokenizer, filler: torch.Tensor, length: int, mix: RecallMix):
        self.tokenizer, self.filler, self.length, self.mix = tokenizer, filler, length, mix
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def row(self, rng: random.Random, reach: float = 1.0, length: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training row of `length` tokens (default the sampler's): one document, or (early in the
        curriculum, `reach` < 1) several shorter ones of about max(shortest, reach * length) tokens, packed."""
        length = length or self.length
        size = max(self.mix.shortest, int(reach * length))
        parts, left = [], length
        while left > 0:
            n = left if left < 2 * size else size
            parts.append(self.document(rng, length=n))
            left -= n
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def document(self, rng: random.Random, reach: float = 1.0, length: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (length,), answer mask (length,) bool). `reach` in (0, 1]: facts lie in the last `reach`
        share of the document before the queries."""
        mix = self.mix
        length = length or self.length
        kind = rng.choices(KINDS, weights=(mix.passkey, mix.mqar))[0]
        facts = draw_facts(kind, rng.choice(mix.pairs), rng)
        while True:  # a short document holds fewer facts: halve them until they fit
            queries = rng.sample(facts, len(facts))
            tail: list[int] = []
            answers: list[bool] = []
            for key, value in queries:
                q, a = self._ids(query_prefix(key)), self._ids(answer_text(value))
                tail += q + a
                # the answer's tokens but its final period: what a model must recall
                answers += [False] * len(q) + [True] * (len(a) - 1) + [False]
            fact_ids = [self._ids(fact_line(k, v)) for k, v in facts]
            body = length - len(tail) - sum(map(len, fact_ids))
            if body >= 1:
                break
            if len(facts) == 1:
                raise ValueError(f"a recall document of {length} tokens cannot hold one fact; make it longer")
            facts = facts[:len(facts) // 2]
        start = rng.randrange(0, self.filler.numel() - body)
        filler = self.filler[start:start + body].tolist()
        lowest = int(body * (1 - max(1e-3, min(1.0, reach))))
        cuts = sorted(rng.randrange(lowest, body + 1) for _ in facts)
        tokens, prev = [], 0
        for cut, ids in zip(cuts, fact_ids):
            tokens += filler[prev:cut] + ids
            prev = cut
        tokens += filler[prev:] + tail
        mask = [False] * (len(tokens) - len(answers)) + answers
        return torch.tensor(tokens), torch.tensor(mask)

    def fixed(self, kind: str, n: int, seed: int, pairs: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n` documents of one kind, the same on every call: a held-out set to measure recall on."""
        mix = self.mix
        self.mix = RecallMix(passkey=float(kind == "passkey"), mqar=float(kind == "mqar"), pairs=(pairs,))
        try:
            rng = random.Random(seed)
            return [self.document(rng) for _ in range(n)]
        finally:
            self.mix = mix


def recall_accuracy(model, docs: list[tuple[torch.Tensor, torch.Tensor]], device="cpu") -> dict:
    """Greedy accuracy on recall documents (teacher-forced): per answer token, and per whole answer."""
    tokens = torch.stack([d[0] for d in docs]).to(device)
    mask = torch.stack([d[1] for d in docs]).to(device)
    with torch.no_grad():
        pred = model(tokens[:, :-1]).argmax(-1)
    hit = (pred == tokens[:, 1:]) | ~mask[:, 1:]
    token_acc = float(((pred == tokens[:, 1:]) & mask[:, 1:]).sum() / mask[:, 1:].sum().clamp(min=1))
    # an answer is a run of masked tokens: it is right when all of its tokens are
    runs, right = 0, 0
    for row_hit, row_mask in zip(hit.tolist(), mask[:, 1:].tolist()):
        ok, inside = True, False
        for h, m in zip(row_hit, row_mask):
            if m:
                ok, inside = ok and h, True
            elif inside:
                runs, right, ok, inside = runs + 1, right + ok, True, False
    return {"recall_token_acc": token_acc, "recall_acc": right / max(1, runs)}
