"""One rich progress bar for long work (training, comparisons): rate and ETA; a no-op when disabled."""

from __future__ import annotations


class Bar:
    """`with Bar(enabled, total, extra_columns) as bar: bar.update(completed=..., **fields) / bar.advance()`.

    extra_columns are rich format strings over the task's fields, e.g. "loss {task.fields[loss]:.3f}".
    """

    def __init__(self, enabled: bool, total: int, description: str = "", extra_columns: tuple[str, ...] = (),
                 start: int = 0, **fields):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 *(TextColumn(c) for c in extra_columns), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn())
        self.task = self.progress.add_task(description, total=total, completed=start, **fields)

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def update(self, **kw):
        if self.enabled:
            self.progress.update(self.task, **kw)

    def advance(self):
        if self.enabled:
            self.progress.advance(self.task)

    def describe(self, text: str, width: int = 36):
        self.update(description=text.ljust(width)[:width])

    def note(self, text: str):
        if self.enabled:
            self.progress.console.log(text)
