"""Progress of long work: the library asks for a bar, the caller decides what a bar is.

Every step that can take more than a few seconds (a distillation, a training loop, a
calibration search, a measurement) reports through :func:`progress_bar`. What the
``progress`` setting handed down from the caller means:

- ``False`` / ``None``: nothing is shown (library use, tests);
- ``True``: a ``tqdm`` bar on stderr;
- a :data:`ProgressFactory` ``(desc, total, unit) -> Progress``: the caller's own bar
  (the CLI passes one; a notebook or a service can pass theirs).

The library itself never prints: only the factory the caller chose writes anywhere.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Protocol


class Progress(Protocol):
    """What a bar must do (``tqdm`` does all of it)."""

    def update(self, n: int = 1) -> object: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> object: ...

    def close(self) -> object: ...


ProgressFactory = Callable[[str, int | None, str], Progress]  # (desc, total or None, unit)
ProgressSetting = bool | ProgressFactory | None


class NullProgress:
    """The bar when progress is off: every call is a no-op."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def tqdm_progress(desc: str, total: int | None, unit: str) -> Progress:
    """A ``tqdm`` bar on stderr that disappears when done (the stage lines stay)."""
    from tqdm.auto import tqdm

    bar: Progress = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
    return bar


def open_progress(
    progress: ProgressSetting, desc: str, total: int | None = None, unit: str = "step", initial: int = 0
) -> Progress:
    """A bar for one long step (the caller closes it); ``total`` None = unknown."""
    if not progress:
        return NullProgress()
    factory: ProgressFactory = tqdm_progress if progress is True else progress
    bar = factory(desc, total, unit)
    if initial:
        bar.update(initial)
    return bar


@contextlib.contextmanager
def progress_bar(
    progress: ProgressSetting, desc: str, total: int | None = None, unit: str = "step", initial: int = 0
) -> Iterator[Progress]:
    """:func:`open_progress` as a context: the bar is closed on exit, also on an exception."""
    bar = open_progress(progress, desc, total, unit, initial)
    try:
        yield bar
    finally:
        bar.close()
