"""data/stats/top_sets.json: the latent sets steering uses, written by `latent_stats` and read by
`interpret`, `steer` and `pipeline latent` / `pipeline class` through `read_top_sets` alone.

The sets are stored as lists of latent ids, most frequent first (docs/METHOD.md, section 4);
`masks` turns them into the boolean masks the sweep and the attribution use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from pipeline.checks import same_classes, same_width
from pipeline.errors import PipelineError
from pipeline.interpret.stats import membership
from pipeline.storage import read_dataclass, write_dataclass


@dataclass(frozen=True)
class TopSets:
    top_k: int
    """The nominal set size K (`stats.top_k`); a set holds only latents that fire, so it can be shorter."""
    n_latents: int
    class_names: list[str]
    global_set: list[int] = field(metadata={"json": "global"})
    """The K latents that fire most often over all training images."""
    per_class: dict[str, list[int]]
    """Class name -> the K latents that fire most often on its training images."""
    mean_active_value: list[float]
    """Per latent: its mean value where it fires (training split), what mode `add` adds."""

    def class_sets(self) -> list[list[int]]:
        """The class sets in class order."""
        return [self.per_class[name] for name in self.class_names]

    def masks(self) -> tuple[Tensor, Tensor]:
        """(C, n_latents) bool per-class masks and the (n_latents,) bool global mask."""
        return membership(self.class_sets(), self.n_latents), membership([self.global_set], self.n_latents)[0]

    def mean_active(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.tensor(self.mean_active_value, dtype=dtype)


def write_top_sets(path: Path | str, sets: TopSets) -> None:
    write_dataclass(path, sets)


def read_top_sets(path: Path | str, classes: tuple[list[str], Path | str] | None = None,
                  width: tuple[int, Path | str] | None = None) -> TopSets:
    """The top sets at `path`; given `classes` (the reader's class names and their file) or
    `width` (its SAE's number of latents and their file), checked against them. A mismatch or a
    malformed file names the files and says to rerun `latent_stats`."""
    sets = read_dataclass(TopSets, path, rerun="latent_stats")
    if classes is not None:
        same_classes(sets.class_names, path, classes[0], classes[1], rerun="latent_stats")
    if width is not None:
        same_width(sets.n_latents, path, width[0], width[1], rerun="latent_stats", what="number of latents")
    members = [j for s in (sets.global_set, *sets.per_class.values()) for j in s]
    if sorted(sets.per_class) != sorted(sets.class_names) or any(not 0 <= j < sets.n_latents for j in members) \
            or len(sets.mean_active_value) != sets.n_latents:
        raise PipelineError(f"{path}: malformed (sets do not match its class names or its {sets.n_latents} latents); rerun `latent_stats`")
    return sets
