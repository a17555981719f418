"""Steering strategies: how each image's decision-network input is moved (docs/METHOD.md, sections 5 and 6).

Two kinds share one registry. A latent strategy names which SAE latents of an image to amplify
(a mask); a control names a unit direction in the decision network's input space, along which
the input moves by exactly as much as the per-class SAE steer moves it for that image and alpha
(matched norm), so the two are compared at equal effort. The registry is read by everything that
needs to know the strategies: parameter checking (`pipeline validate` and every command), the
sweep (`pipeline.steering.sweep`), the figures and the report. Adding a strategy is one mask or
direction function plus one `Strategy` entry in `STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.errors import ParamsError


@dataclass
class Directions:
    """The controls' unit directions in the decision network's input space (width D)."""

    random: Tensor
    """(draws, C, D) seeded random unit directions, one per class and draw (the controls' null)."""
    class_mean: Tensor
    """(C, D) the class's mean training embedding minus the mean training embedding, normalised
    (zero for a class without training images)."""
    gate: Tensor
    """(D,) minus the sum of the final block's decision-network rows, normalised: the direction
    that lowers the sum of its gate logits fastest."""

    def to(self, device: torch.device | str) -> Directions:
        return Directions(self.random.to(device), self.class_mean.to(device), self.gate.to(device))


@dataclass
class SteeringSets:
    """What the strategies draw from: latent sets as boolean masks over the SAE's latents, and
    (for the controls) unit directions."""

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
    directions: Directions | None = None
    """The controls' directions (None: no control can run)."""

    def to(self, device: torch.device | str) -> SteeringSets:
        moved = (t.to(device) for t in (self.per_class, self.global_set, self.random, self.random_per_class, self.mean_active))
        return SteeringSets(*moved, directions=None if self.directions is None else self.directions.to(device))


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
RANDOM_DIRECTION = "random_direction"
CLASS_DIRECTION = "class_direction"
GATE_DIRECTION = "gate_direction"

MATCHED_TO = PER_CLASS
"""The latent strategy whose steer's norm, per image and alpha, every control moves by."""

MaskFn = Callable[["SteeringSets", SteerBatch, int], Tensor]
"""(sets, batch, draw) -> (B, n_latents) bool mask of the latents to steer."""
DirectionFn = Callable[["SteeringSets", SteerBatch, int], Tensor]
"""(sets, batch, draw) -> (B, D) unit direction to move each image's decision input along."""


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    """One line for the report: what is steered and what it needs."""
    mask: MaskFn | None = None
    """A latent strategy: the latents it amplifies."""
    direction: DirectionFn | None = None
    """A control: the direction it moves along, at the norm of the `MATCHED_TO` steer."""
    uses_draws: bool = False
    """True: evaluated once per seeded draw (`steer.null_draws`), reported as the mean."""
    null: str | None = None
    """The strategy whose seeded draws are this one's null (random sets of the same sizes)."""
    colour: str = "black"
    marker: str = "x"

    @property
    def is_control(self) -> bool:
        return self.direction is not None


def per_class_mask(sets: SteeringSets, batch: SteerBatch, draw: int) -> Tensor:
    return sets.per_class[batch.labels]


def per_class_predicted_mask(sets: SteeringSets, batch: SteerBatch, draw: int) -> Tensor:
    return sets.per_class[batch.predictions]


def global_mask(sets: SteeringSets, batch: SteerBatch, draw: int) -> Tensor:
    return sets.global_set.expand(len(batch.labels), -1)


def random_mask(sets: SteeringSets, batch: SteerBatch, draw: int) -> Tensor:
    return sets.random[draw].expand(len(batch.labels), -1)


def random_per_class_mask(sets: SteeringSets, batch: SteerBatch, draw: int) -> Tensor:
    return sets.random_per_class[draw][batch.labels]


def random_direction(sets: SteeringSets, batch: SteerBatch, draw: int) -> Tensor:
    return _directions(sets).random[draw][batch.labels]


def class_direction(sets: SteeringSets, batch: SteerBatch, draw: int) -> Tensor:
    return _directions(sets).class_mean[batch.labels]


def gate_direction(sets: SteeringSets, batch: SteerBatch, draw: int) -> Tensor:
    return _directions(sets).gate.expand(len(batch.labels), -1)


def _directions(sets: SteeringSets) -> Directions:
    if sets.directions is None:
        raise ValueError("a control strategy needs SteeringSets.directions (pipeline.steering.controls.control_directions)")
    return sets.directions


MATCHED = f"moved by the norm of the {MATCHED_TO} steer's change, per image and alpha"
STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(PER_CLASS, "the top set of the image's true class (an oracle: needs the label)", mask=per_class_mask,
                 null=RANDOM_PER_CLASS, colour="tab:green", marker="o"),
        Strategy(PER_CLASS_PREDICTED, "the top set of the class the unsteered model predicts (deployable: no label needed)",
                 mask=per_class_predicted_mask, colour="tab:olive", marker="D"),
        Strategy(GLOBAL, "the top set over all classes, for every image", mask=global_mask, null=RANDOM,
                 colour="tab:blue", marker="s"),
        Strategy(RANDOM, "seeded random sets of alive latents, the global set's size (the global set's null)",
                 mask=random_mask, uses_draws=True, colour="tab:gray", marker="^"),
        Strategy(RANDOM_PER_CLASS, "seeded random sets of alive latents, the size of the image's class set (the per-class null)",
                 mask=random_per_class_mask, uses_draws=True, colour="tab:pink", marker="v"),
        Strategy(RANDOM_DIRECTION, f"control: a seeded random direction per class, {MATCHED} (the controls' null)",
                 direction=random_direction, uses_draws=True, colour="tab:brown", marker="<"),
        Strategy(CLASS_DIRECTION, f"control: the true class's mean embedding minus the mean embedding (train split), {MATCHED}; "
                 "no SAE", direction=class_direction, null=RANDOM_DIRECTION, colour="tab:purple", marker="P"),
        Strategy(GATE_DIRECTION, f"control: minus the sum of the final block's decision-network rows (the linear optimum for "
                 f"closing heads: an upper reference), {MATCHED}", direction=gate_direction, null=RANDOM_DIRECTION,
                 colour="tab:red", marker="*"),
    )
}


def check_strategies(names: list[str], source: str = "") -> None:
    """A ParamsError naming the first of `names` that is not a registered strategy (`source`,
    e.g. "invalid parameters in params.yaml: ", is put in front of the message)."""
    unknown = [(i, name) for i, name in enumerate(names) if name not in STRATEGIES]
    if unknown:
        position, name = unknown[0]
        raise ParamsError(f"{source}steer.strategies.{position} = {name!r}: unknown strategy (known: {', '.join(STRATEGIES)})")
