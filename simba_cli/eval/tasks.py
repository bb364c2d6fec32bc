"""Offline evaluation tasks built from held-out plays, as lm-eval YAML on local JSONL files.

    simba_cloze   LAMBADA-like: a passage cut before the last word of a verse line; predict that word
                  (metrics: acc = the word is the greedy continuation, perplexity)
    simba_choice  HellaSwag-like: a passage and four candidate next lines, one true, three from
                  elsewhere in the same play (acc, acc_norm)
    simba_recall  long-range recall: a line from early in a long passage is repeated at its end, cut
                  before a name (a capitalised word) that occurs nowhere else in the passage; pick the
                  name among four from the same play (acc, acc_norm). Keeping only recent tokens cannot
                  solve it: the answer is only far back.
    simba_recall_long   the same in passages of about 2,000 tokens
    simba_passkey       a pass key (a one-token noun) stated once at depth d in {0, 0.25, 0.5, 0.75, 1} of a
                        passage of L in {256, 512, 1024, 2048} tokens, asked for at the end: pick it among
                        five keys (acc)
    simba_passkey_exact the same documents, scored by greedy exact match of the key (acc)
    simba_mqar          multi-query associative recall in words (data.longrange): K in {4, 8, 16} facts
                        "the <key> is <value>" spread through a passage of 512 or 1024 tokens, queries at
                        the end, earlier ones answered; greedy exact match of the one-token value (acc)

The long-range documents (data.longrange) use the facts' format the zoo was trained on, with the
evaluation plays as filler; lengths are counted in the embedded zoo's tokens. Each document records the
depth of its fact and `recent_drops_fact_below`: with the linear schedule, `recent` no longer lets the
fact's tokens into the last layer when final_keep is below this number (the layers below may still
carry it forward). Documents cycle through the settings, so --limit keeps every setting represented.

The examples are drawn with a fixed seed from the evaluation plays (never seen in training), so the
same files are rebuilt on every machine. They are written once into the cache (SIMBA_CACHE, default
~/.cache/simba) under a name that hashes the source text and the builder's version.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

from simba_cli.errors import UserError

VERSION = 5  # bump whenever the examples change
TASKS = ("simba_cloze", "simba_choice", "simba_recall")
LONG_RANGE = ("simba_recall_long", "simba_passkey", "simba_passkey_exact", "simba_mqar")
ALL_TASKS = TASKS + LONG_RANGE
PASSKEY_LENGTHS = (256, 512, 1024, 2048)
PASSKEY_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MQAR_PAIRS = (4, 8, 16)
MQAR_LENGTHS = (512, 1024)
_SPEAKER = re.compile(r"^[A-Z][A-Z .,'’-]+:$")
_WORD = re.compile(r"[A-Za-z][a-z]+")


def _lines(play: str) -> list[str]:
    return [ln for ln in play.split("\n") if ln.strip()]


def _is_verse(line: str, min_words: int = 4) -> bool:
    return not _SPEAKER.match(line) and len(line.split()) >= min_words


def _passage_before(lines: list[str], end: int, chars: int) -> int:
    """Index of the first line so that lines[start:end] holds about `chars` characters."""
    start, total = end, 0
    while start > 0 and total < chars:
        start -= 1
        total += len(lines[start]) + 1
    return start


def cloze_examples(plays: list[str], n: int, rng: random.Random, chars: int = 800) -> list[dict]:
    out = []
    candidates = [(p, i) for p, lines in enumerate(map(_lines, plays)) for i, line in enumerate(lines)
                  if i > 60 and _is_verse(line, 5) and re.search(r"\b[A-Za-z]{3,}[.,;:!?]*$", line)]
    for p, i in rng.sample(candidates, min(n, len(candidates))):
        lines = _lines(plays[p])
        words = lines[i].split()
        last = re.sub(r"[^A-Za-z'’-]+$", "", words[-1])
        if len(last) < 3:
            continue
        start = _passage_before(lines, i, chars)
        context = "\n".join(lines[start:i] + [" ".join(words[:-1])])
        out.append({"context": context, "target": last})
    return out


def choice_examples(plays: list[str], n: int, rng: random.Random, chars: int = 600) -> list[dict]:
    out = []
    per_play = [_lines(p) for p in plays]
    candidates = [(p, i) for p, lines in enumerate(per_play) for i, line in enumerate(lines)
                  if i > 40 and _is_verse(line) and not _SPEAKER.match(lines[i - 1])]
    for p, i in rng.sample(candidates, min(n, len(candidates))):
        lines = per_play[p]
        far = [j for j in range(len(lines)) if abs(j - i) > 200 and _is_verse(lines[j])
               and abs(len(lines[j]) - len(lines[i])) < 12]
        if len(far) < 3:
            continue
        endings = [lines[i]] + [lines[j] for j in rng.sample(far, 3)]
        order = list(range(4))
        rng.shuffle(order)
        start = _passage_before(lines, i, chars)
        out.append({"context": "\n".join(lines[start:i]), "choices": [endings[k] for k in order],
                    "label": order.index(0)})
    return out


def proper_names(play: str) -> set[str]:
    """Words capitalised inside lines at least twice and never written in lower case: mostly names."""
    inner, lower = {}, set()
    for line in _lines(play):
        for m in list(_WORD.finditer(line))[1:]:
            w = m.group()
            if w[0].isupper():
                inner[w] = inner.get(w, 0) + 1
            else:
                lower.add(w)
    return {w for w, c in inner.items() if c >= 2 and len(w) >= 4 and w.lower() not in lower}


def recall_examples(plays: list[str], n: int, rng: random.Random, chars: int = 1200) -> list[dict]:
    out = []
    names = [proper_names(p) for p in plays]
    for _ in range(n * 50):
        if len(out) >= n:
            break
        p = rng.randrange(len(plays))
        lines = _lines(plays[p])
        end = rng.randrange(100, len(lines))
        start = _passage_before(lines, end, chars)
        passage = lines[start:end]
        early = passage[: max(1, len(passage) // 4)]
        later_text = "\n".join(passage[len(early):])
        options = []
        for k, line in enumerate(early):
            if _SPEAKER.match(line):
                continue
            for m in list(_WORD.finditer(line))[1:]:  # not the line's first word (capitalised anyway)
                w = m.group()
                if w in names[p] and not re.search(rf"\b{w}\b", later_text):
                    options.append((k, m.start(), w))
        if not options:
            continue
        k, at, name = rng.choice(options)
        passage_text = "\n".join(passage)
        pool = sorted(w for w in names[p] if w != name and not re.search(rf"\b{w}\b", passage_text))
        if len(pool) < 3:
            continue
        choices = [name] + rng.sample(pool, 3)
        order = list(range(4))
        rng.shuffle(order)
        context = passage_text + "\n" + early[k][:at].rstrip()
        out.append({"context": context, "choices": [choices[i] for i in order], "label": order.index(0),
                    "distance_chars": len(passage_text) - passage_text.index(early[k])})
    return out


class _Filler:
    """Passages of consecutive lines of the evaluation plays, measured in the embedded zoo's tokens."""

    def __init__(self, plays: list[str], tokenizer):
        self.plays = [_lines(p) for p in plays]
        self.tokenizer = tokenizer
        self.counts = [[len(ids) + 1 for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]
                       for lines in self.plays]

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def passage(self, rng: random.Random, n_tokens: int) -> tuple[list[str], list[int]]:
        """Lines (and their token counts) of one play from a random start, about n_tokens in all."""
        p = rng.randrange(len(self.plays))
        lines, counts = self.plays[p], self.counts[p]
        start = rng.randrange(0, max(1, len(lines) - 1))
        out, got, total = [], [], 0
        for i in range(start, start + len(lines)):
            if total >= n_tokens:
                break
            k = i % len(lines)
            out.append(lines[k])
            got.append(counts[k])
            total += counts[k]
        return out, got


def _insert(lines: list[str], counts: list[int], facts: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """The passage with each fact line placed at its depth (a share of the passage's tokens); returns the
    text and, per fact, the number of the passage's tokens after it."""
    total = sum(counts)
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    at = [min(range(len(cum)), key=lambda i: abs(cum[i] - depth * total)) for depth, _ in facts]
    text, after = "", []
    order = sorted(range(len(facts)), key=lambda j: at[j])
    prev = 0
    for j in order:
        text += "\n".join(lines[prev:at[j]]) + facts[j][1]
        prev = at[j]
    text += "\n".join(lines[prev:])
    after = [total - cum[at[j]] for j in range(len(facts))]
    return text, after


def passkey_examples(plays: list[str], n: int, rng: random.Random, filler: _Filler) -> list[dict]:
    """n documents cycling through every (length, depth): a pass key, and five keys to choose from."""
    from simba_cli.data.longrange import PASSKEY, fact_line, passkey_value, query_prefix

    cells = [(L, d) for L in PASSKEY_LENGTHS for d in PASSKEY_DEPTHS]
    out = []
    for i in range(n):
        L, depth = cells[i % len(cells)]
        key = passkey_value(rng)
        fact, question = fact_line(PASSKEY, key), query_prefix(PASSKEY)
        budget = L - filler.tokens(fact) - filler.tokens(question)
        lines, counts = filler.passage(rng, budget)
        text, (after,) = _insert(lines, counts, [(depth, fact)])
        others = set()
        while len(others) < 4:
            if (k := passkey_value(rng)) != key:
                others.add(k)
        choices = [key, *sorted(others)]
        rng.shuffle(choices)
        q = filler.tokens(question)
        out.append({"context": text + question, "answer": key, "choices": choices, "label": choices.index(key),
                    "length": L, "depth": depth, "tokens": sum(counts) + filler.tokens(fact) + q,
                    "recent_drops_fact_below": round((after + q) / L, 4)})
    return out


def mqar_examples(plays: list[str], n: int, rng: random.Random, filler: _Filler, asked: int = 4) -> list[dict]:
    """Passages cycling through every (length, pairs), each with its first `asked` queries as documents."""
    from simba_cli.data.longrange import answer_text, draw_facts, fact_line, query_prefix

    cells = [(L, k) for L in MQAR_LENGTHS for k in MQAR_PAIRS]
    out, passage_id = [], 0
    while len(out) < n:
        L, k = cells[passage_id % len(cells)]
        facts = draw_facts("mqar", k, rng)
        lines_text = [fact_line(key, value) for key, value in facts]
        budget = L - sum(map(filler.tokens, lines_text)) - asked * filler.tokens(query_prefix(facts[0][0]) + " x.")
        lines, counts = filler.passage(rng, budget)
        depths = [rng.random() for _ in facts]
        text, after = _insert(lines, counts, list(zip(depths, lines_text)))
        answered = ""
        for j in rng.sample(range(k), min(asked, k)):
            key, value = facts[j]
            q = filler.tokens(answered + query_prefix(key))
            out.append({"context": text + answered + query_prefix(key), "answer": value, "length": L, "pairs": k,
                        "depth": round(depths[j], 4), "passage": passage_id,
                        "recent_drops_fact_below": round((after[j] + q) / L, 4)})
            answered += query_prefix(key) + answer_text(value)
        passage_id += 1
    return out[:n]


def long_recall_examples(plays: list[str], n: int, rng: random.Random) -> list[dict]:
    return recall_examples(plays, n, rng, chars=7000)


def _zoo_tokenizer():
    from simba_cli.models import zoo
    from simba_cli.models.tokenizer import load_tokenizer

    names = zoo.names()
    if not names:
        raise UserError("the long-range tasks count lengths in the zoo's tokens, and the zoo is empty; "
                        "train it with `make zoo`")
    return load_tokenizer(zoo.path(names[0]))


_YAML = {
    "simba_cloze": """task: simba_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
""",
    "simba_choice": """task: simba_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
""",
}
_YAML["simba_recall"] = _YAML["simba_choice"].replace("simba_choice", "simba_recall").replace(
    'target_delimiter: "\\n"', 'target_delimiter: " "')
_YAML["simba_recall_long"] = _YAML["simba_recall"].replace("simba_recall", "simba_recall_long")
_YAML["simba_passkey"] = _YAML["simba_recall"].replace("simba_recall", "simba_passkey").replace(
    "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n", "")
# exact match: lm-eval's `acc` of a loglikelihood request is whether the target is the greedy continuation.
# A loglikelihood request's continuation is doc_to_target alone (lm-eval adds no target_delimiter to it, as
# LAMBADA's own YAML does): the word's leading space is part of the target.
_YAML["simba_passkey_exact"] = _YAML["simba_cloze"].replace("simba_cloze", "simba_passkey_exact").replace(
    "' ' + target", "' ' + answer").replace(
    "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n", "")
_YAML["simba_mqar"] = _YAML["simba_passkey_exact"].replace("simba_passkey_exact", "simba_mqar")

_BUILDERS = {"simba_cloze": cloze_examples, "simba_choice": choice_examples, "simba_recall": recall_examples,
             "simba_recall_long": long_recall_examples, "simba_passkey": passkey_examples,
             "simba_mqar": mqar_examples}


def build_tasks(source: str = "shakespeare", n: int = 500, seed: int = 1234, root: Path | None = None) -> Path:
    """Write the tasks (JSONL + lm-eval YAML) and return their directory (an lm-eval include path)."""
    from simba_cli.data.bpe import cache_dir
    from simba_cli.data.corpus import load_texts

    plays = load_texts(source, "evaluation")
    if not plays:
        raise UserError(f"no evaluation texts in {source!r}; the tasks need held-out text")
    digest = hashlib.sha256(json.dumps([VERSION, n, seed, [hashlib.sha256(p.encode()).hexdigest()
                                                          for p in plays]]).encode()).hexdigest()[:12]
    directory = (root or cache_dir() / "tasks") / f"{digest}"
    if (directory / "complete").is_file():
        return directory
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    filler = _Filler(plays, _zoo_tokenizer())
    built = {}
    for name in ALL_TASKS:
        if name == "simba_passkey_exact":  # the pass-key documents, scored by exact match
            docs = built["simba_passkey"]
        elif name in ("simba_passkey", "simba_mqar"):
            docs = _BUILDERS[name](plays, n, random.Random(f"{seed}-{name}"), filler)
        else:
            docs = _BUILDERS[name](plays, n, random.Random(f"{seed}-{name}"))
        built[name] = docs
        if not docs:
            raise UserError(f"could not build task {name} from {source!r}: the held-out text is too short")
        data = directory / f"{name}.jsonl"
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tmp / f"{name}.yaml").write_text(_YAML[name].format(data=json.dumps(str(data)), version=VERSION))
    (tmp / "complete").write_text("")
    try:
        tmp.rename(directory)
    except OSError:  # another process finished first: its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return directory
