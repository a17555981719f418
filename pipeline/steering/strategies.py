"""Steering strategies: which latents of which image to amplify (docs/METHOD.md, section 5).

One registry, read by everything that needs to know the strategies: parameter checking
(`pipeline validate` and every command), the sweep (`pipeline.steering.sweep`), the figures and the
report. Adding a strategy is one mask function plus one `Strategy` entry in `STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.errors import ParamsError


@dataclass
class LatentSets:
    """The latent sets steering uses, as boolean masks over the SAE's latents."""

    per_class: Tensor
    """(C, n_latents) bool: the top set of each class."""
    global_set: Tensor
    """(n_latents,) bool: the top set over all classes."""
    random: Tensor
    """(draws, n_latents) bool: random sets of alive latents, the global set's size."""
    random_per_class: Tensor
    """(draws, C, n_latents) bool: random sets of alive latents, each class set's size."""
    mean_active: Tensor
    """(n_latents,) mean active value of each latent (for mode "add")."""

    def to(self, device: torch.device | str) -> LatentSets:
        return LatentSets(*(t.to(device) for t in (self.per_class, self.global_set, self.random, self.random_per_class, self.mean_active)))


@dataclass(frozen=True)
class SteerBatch:
    """What a strategy may look at to choose an image's latents."""

    labels: Tensor
    """(B,) true classes (only an oracle strategy uses them)."""
    predictions: Tensor
    """(B,) the unsteered model's predicted classes."""


# The registry's names, for the code that treats a strategy specially (the headline, the nulls):
# spelled here once, never as a literal elsewhere.
PER_CLASS = "per_class"
PER_CLASS_PREDICTED = "per_class_predicted"
GLOBAL = "global"
RANDOM = "random"
RANDOM_PER_CLASS = "random_per_class"

MaskFn = Callable[[LatentSets, SteerBatch, int], Tensor]
"""(sets, batch, draw) -> (B, n_latents) bool mask of the latents to steer."""


@dataclass(frozen=True)
class Strategy:
    name: str
    mask: MaskFn
    description: str
    """One line for the report: what set is steered and what it needs."""
    uses_draws: bool = False
    """True: evaluated once per seeded draw (`steer.null_draws`), reported as the mean."""
    null: str | None = None
    """The strategy whose seeded draws are this one's null (random sets of the same sizes)."""
    colour: str = "black"
    marker: str = "x"


def per_class_mask(sets: LatentSets, batch: SteerBatch, draw: int) -> Tensor:
    return sets.per_class[batch.labels]


def per_class_predicted_mask(sets: LatentSets, batch: SteerBatch, draw: int) -> Tensor:
    return sets.per_class[batch.predictions]


def global_mask(sets: LatentSets, batch: SteerBatch, draw: int) -> Tensor:
    return sets.global_set.expand(len(batch.labels), -1)


def random_mask(sets: LatentSets, batch: SteerBatch, draw: int) -> Tensor:
    return sets.random[draw].expand(len(batch.labels), -1)


def random_per_class_mask(sets: LatentSets, batch: SteerBatch, draw: int) -> Tensor:
    return sets.random_per_class[draw][batch.labels]


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(PER_CLASS, per_class_mask, "the top set of the image's true class (an oracle: needs the label)",
                 null=RANDOM_PER_CLASS, colour="tab:green", marker="o"),
        Strategy(PER_CLASS_PREDICTED, per_class_predicted_mask,
                 "the top set of the class the unsteered model predicts (deployable: no label needed)",
                 colour="tab:olive", marker="D"),
        Strategy(GLOBAL, global_mask, "the top set over all classes, for every image", null=RANDOM,
                 colour="tab:blue", marker="s"),
        Strategy(RANDOM, random_mask, "seeded random sets of alive latents, the global set's size (the global set's null)",
                 uses_draws=True, colour="tab:gray", marker="^"),
        Strategy(RANDOM_PER_CLASS, random_per_class_mask,
                 "seeded random sets of alive latents, the size of the image's class set (the per-class null)",
                 uses_draws=True, colour="tab:pink", marker="v"),
    )
}


def check_strategies(names: list[str], source: str = "") -> None:
    """A ParamsError naming the first of `names` that is not a registered strategy (`source`,
    e.g. "invalid parameters in params.yaml: ", is put in front of the message)."""
    unknown = [(i, name) for i, name in enumerate(names) if name not in STRATEGIES]
    if unknown:
        position, name = unknown[0]
        raise ParamsError(f"{source}steer.strategies.{position} = {name!r}: unknown strategy (known: {', '.join(STRATEGIES)})")
