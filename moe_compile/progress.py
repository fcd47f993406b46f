"""Progress display for long work (rich), quiet when output is not a terminal or when disabled."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable, Iterator, Sized, TypeVar

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


@contextlib.contextmanager
def status(description: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with `description` on stderr while the block runs (terminal only, quiet with MOE_COMPILE_QUIET=1),
    for work of unknown length such as compiling and capturing a graph."""
    if not _wanted(enabled):
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(description):
        yield
