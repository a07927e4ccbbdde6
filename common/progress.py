"""Progress bars for long work (loading a span, measuring it), on stderr, only when asked.

The CLI asks when stderr is a terminal; tests and piped logs get nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(
    enabled: bool, description: str, total: float, bytes_: bool = False
) -> Iterator[Callable[[float], None]]:
    """Yields `advance(amount)`; a no-op unless `enabled`. Thread-safe (rich locks its tasks)."""
    if not enabled:
        yield lambda amount=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    count = DownloadColumn() if bytes_ else MofNCompleteColumn()
    with Progress(TextColumn("{task.description}"), BarColumn(), count, TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda amount=1: bar.advance(task, amount)
