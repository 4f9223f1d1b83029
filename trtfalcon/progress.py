"""The progress bar of the long stages (synth, convert, export, kernel compilation) that the CLI and the demo show.

Shown only on a terminal: a pipe or a log file gets the stage's own output lines, not bar redraws.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def progress_bar(total: int, description: str) -> tuple[Any, Any]:
    """(rich Progress, task id): start it with `with progress:`; update the task with `advance=` bytes done or
    `completed=`, and `tensor=` the name shown after the bar."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[tensor]}"), transient=False, disable=not sys.stderr.isatty(),
    )
    task = progress.add_task(description, total=total, tensor="")
    return progress, task


@contextmanager
def progress_messages(description: str) -> Iterator[Callable[[str], None]]:
    """A progress bar for a stage that reports messages, not bytes (kernel compilation): yields the callable that
    shows each message after the bar."""
    progress, task = progress_bar(0, description)
    with progress:
        yield lambda message: progress.update(task, tensor=message)


def count_bar(total: int, description: str) -> tuple[Any, Any]:
    """(rich Progress, task id) for a stage that counts items (test-time scaling's traces): done / total, elapsed
    and remaining time, and `info=` a short text shown after the bar. Start it with `with progress:`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False, disable=not sys.stderr.isatty(),
    )
    task = progress.add_task(description, total=total, info="")
    return progress, task
