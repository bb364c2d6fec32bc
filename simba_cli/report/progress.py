"""One rich progress bar for long work (training, evaluation, comparisons): rate and ETA; a no-op when
disabled. It draws on stderr, so that stdout carries only results."""

from __future__ import annotations


class Bar:
    """`with Bar(enabled, total, extra_columns) as bar: bar.update(completed=..., **fields) / bar.advance()`.

    extra_columns are rich format strings over the task's fields, e.g. "loss {task.fields[loss]:.3f}";
    `unit` adds the measured rate ("12.5 req/s").
    """

    def __init__(self, enabled: bool, total: int, description: str = "", extra_columns: tuple[str, ...] = (),
                 start: int = 0, unit: str | None = None, **fields):
        self.enabled = enabled
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(TextColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                return Text(self.text_format if speed is None else f"{speed:.3g} {unit}/s")

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 *(TextColumn(c) for c in extra_columns), *([Rate("-")] if unit else []),
                                 TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=Console(stderr=True), redirect_stdout=False)
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
        self.advance_by(1)

    def advance_by(self, n: int):
        if self.enabled:
            self.progress.advance(self.task, n)

    def describe(self, text: str, width: int = 24):
        self.update(description=text.ljust(width)[:width])

    def note(self, text: str):
        if self.enabled:
            self.progress.console.log(text)
