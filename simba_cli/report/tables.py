"""Tables: the terminal (rich), and CSV / Markdown / JSON files written atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from simba_cli.outdir import write_atomic


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int) and abs(v) >= 10**6:
        return f"{v:.3e}"
    return str(v)


def print_table(rows: list[dict], title: str = ""):
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None, box=box.SIMPLE_HEAD)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    for c in columns:
        numeric = rows and isinstance(rows[0].get(c), (int, float))
        table.add_column(str(c), justify="right" if numeric else "left", no_wrap=True)
    for r in rows:
        table.add_row(*(_fmt(r.get(c)) for c in columns))
    console = Console()
    if not console.is_terminal:  # a pipe or a log file: never squeeze the table into 80 columns
        console = Console(width=max(80, table.__rich_measure__(console, console.options).maximum))
    console.print(table)


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], stem: Path, formats=("csv", "md", "json"), notes: str = ""):
    """rows -> stem.csv, stem.md (after `notes`: what the columns mean), stem.json."""
    stem = Path(stem)
    if "csv" in formats:
        write_atomic(stem.with_suffix(".csv"), pd.DataFrame(rows).to_csv(index=False))
    if "md" in formats:
        write_atomic(stem.with_suffix(".md"), (notes + "\n" if notes else "") + markdown_table(rows))
    if "json" in formats:
        write_atomic(stem.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
