"""Offline evaluation tasks built from held-out plays, as lm-eval YAML on local JSONL files.

    simba_cloze   LAMBADA-like: a passage cut before the last word of a verse line; predict that word
                  (metrics: acc = the word is the greedy continuation, perplexity)
    simba_choice  HellaSwag-like: a passage and four candidate next lines, one true, three from
                  elsewhere in the same play (acc, acc_norm)
    simba_recall  long-range recall: a line from early in a long passage is repeated at its end, cut
                  before a name (a capitalised word) that occurs nowhere else in the passage; pick the
                  name among four from the same play (acc, acc_norm). Keeping only recent tokens cannot
                  solve it: the answer is only far back.

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

VERSION = 2  # bump whenever the examples change
TASKS = ("simba_cloze", "simba_choice", "simba_recall")
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


_YAML = {
    "simba_cloze": """task: simba_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: " "
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

_BUILDERS = {"simba_cloze": cloze_examples, "simba_choice": choice_examples, "simba_recall": recall_examples}


def build_tasks(source: str = "shakespeare", n: int = 500, seed: int = 1234, root: Path | None = None) -> Path:
    """Write the three tasks (JSONL + lm-eval YAML) and return their directory (an lm-eval include path)."""
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
    for name in TASKS:
        docs = _BUILDERS[name](plays, n, random.Random(f"{seed}-{name}"))
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
