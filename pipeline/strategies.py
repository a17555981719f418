"""Steering strategies: which latents of which image to amplify (METHOD.md section 5).

One registry, read by everything that needs to know the strategies: parameter checking
(`pipeline validate` and every command), the sweep (`pipeline.steering`), the figures and the
report. Adding a strategy is one mask function plus one `Strategy` entry in `STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass
class LatentSets:
    """The latent sets steering uses, as boolean masks over the SAE's latents."""

    per_class: Tensor
    """(C, n_latents) bool: the top set of each class."""
    global_set: Tensor
    """(n_latents,) bool: the top set over all classes."""
    random: Tensor
    """(draws, n_latents) bool: random sets of the global set's size."""
    mean_active: Tensor
    """(n_latents,) mean active value of each latent (for mode "add")."""

    def to(self, device) -> LatentSets:
        return LatentSets(*(t.to(device) for t in (self.per_class, self.global_set, self.random, self.mean_active)))


MaskFn = Callable[[LatentSets, Tensor, int], Tensor]
"""(sets, (B,) true labels, draw) -> (B, n_latents) bool mask of the latents to steer."""


@dataclass(frozen=True)
class Strategy:
    name: str
    mask: MaskFn
    description: str
    """One line for the report: what set is steered and what it needs."""
    uses_draws: bool = False
    """True: evaluated once per seeded draw (`steer.random_draws`), reported as the mean."""
    colour: str = "black"
    marker: str = "x"


def per_class_mask(sets: LatentSets, labels: Tensor, draw: int) -> Tensor:
    return sets.per_class[labels]


def global_mask(sets: LatentSets, labels: Tensor, draw: int) -> Tensor:
    return sets.global_set.expand(len(labels), -1)


def random_mask(sets: LatentSets, labels: Tensor, draw: int) -> Tensor:
    return sets.random[draw].expand(len(labels), -1)


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("per_class", per_class_mask, "the top set of the image's true class (an oracle: needs the label)",
                 colour="tab:green", marker="o"),
        Strategy("global", global_mask, "the top set over all classes, for every image", colour="tab:blue", marker="s"),
        Strategy("random", random_mask, "seeded random sets of alive latents, the global set's size",
                 uses_draws=True, colour="tab:gray", marker="^"),
    )
}


def unknown_strategies(names: list[str]) -> list[tuple[int, str]]:
    """(position, name) of every name that is not a registered strategy."""
    return [(i, name) for i, name in enumerate(names) if name not in STRATEGIES]
