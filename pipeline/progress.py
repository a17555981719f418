"""Progress bars: a bar with rate and ETA on a terminal, silent when output goes to a log."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
        leave=False,
    )
