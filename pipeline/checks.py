"""Checks between artifacts of different stages, written once.

Each takes values already loaded, plus the paths they came from, and raises a PipelineError
that names both files and the stage to rerun. Artifacts go stale when a user reruns one stage
by hand or edits a file; DVC's own bookkeeping cannot catch that.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.errors import PipelineError


def same_classes(names: Sequence[str], path: Path | str, expected: Sequence[str], expected_path: Path | str, rerun: str) -> None:
    """Two artifacts name the same classes in the same order."""
    if list(names) != list(expected):
        raise PipelineError(f"{path}: class names differ from {expected_path}; rerun `{rerun}`")


def same_width(width: int, path: Path | str, expected: int, expected_path: Path | str, rerun: str, what: str = "embedding width") -> None:
    """Two artifacts agree on a size (the embedding width D, the number of latents, ...)."""
    if int(width) != int(expected):
        raise PipelineError(f"{path}: {what} {width} differs from {expected_path} ({expected}); rerun `{rerun}`")


def same_rows(labels: torch.Tensor, path: Path | str, expected: torch.Tensor, expected_path: Path | str, rerun: str) -> None:
    """Per-image artifacts hold the same images in the same order (compared by label)."""
    if len(labels) != len(expected) or not torch.equal(labels, expected):
        raise PipelineError(f"{path} does not match {expected_path} (rows or labels differ); rerun `{rerun}`")


def labels_in_range(labels: torch.Tensor, path: Path | str, n_classes: int) -> None:
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise PipelineError(f"{path}: labels outside [0, {n_classes}) (class_names has {n_classes})")
