"""Progress display for long work (rich), quiet when output is not a terminal or when disabled."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Sized, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def _wanted(enabled: bool) -> bool:
    return enabled and sys.stderr.isatty() and os.environ.get("MOE_COMPILE_QUIET") != "1"


def progress(items: Iterable[T], description: str, enabled: bool = True) -> Iterable[T]:
    """Yield `items`, showing a progress bar on stderr while at least two items are processed on a terminal."""
    items = list(items)
    if not _wanted(enabled) or len(items) < 2:
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=len(items) if isinstance(items, Sized) else None)
        for item in items:
            yield item
            bar.advance(task)
