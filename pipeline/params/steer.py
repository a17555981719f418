"""`steer`: the steering sweep and its headline rule (read by `steer`; `report` reads its printing choices)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from pipeline.params.base import Device, HeadPath, Section


def _block_selection(value: object) -> object:
    """`steer.blocks` checked before pydantic tries each form of the union, so that a bad value
    gets one message naming the key, not one per form."""
    if value in ("final", "all"):
        return value
    if isinstance(value, list) and value and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in value):
        return value
    raise ValueError("must be 'final', 'all' or a non-empty list of block indices (integers >= 0)")


class SteerParams(Section):
    """`steer`: amplify latent sets and measure accuracy and final-block head usage."""

    strategies: list[str] = ["per_class", "per_class_predicted", "global", "random", "random_per_class",
                             "random_direction", "class_direction", "gate_direction"]
    """What to steer, by name in `pipeline.steering.strategies.STRATEGIES`. Latent sets:
    `per_class` (the true class's set, an oracle), `per_class_predicted` (the set of the class the
    unsteered model predicts: deployable), `global` (the global set), `random` /
    `random_per_class` (random sets of the global set's / the class set's size: the nulls).
    Controls, each moving the decision input by the norm of the `per_class` steer's change for
    that image and alpha (docs/METHOD.md, section 6): `random_direction` (a seeded random
    direction per class: the controls' null), `class_direction` (the true class's mean training
    embedding minus the mean: no SAE), `gate_direction` (the direction that lowers the final
    block's gate logits fastest: an upper reference). Unknown names: exit 2."""
    alphas: list[float] = [-1.0, -0.75, -0.5, -0.25, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    """Steering strengths; 0 is the unsteered baseline and is always evaluated. The default runs
    far enough that every strategy's usage curve flattens in mode `scale` (a head's logit moves
    linearly in alpha, so past some alpha every head is kept or dropped by the push's sign alone;
    below zero, -1 ablates the set)."""
    mode: Literal["scale", "add"] = "scale"
    """`scale`: z_j -> (1 + alpha) z_j; `add`: z_j -> z_j + alpha * (mean active value of j)."""
    keep_error: bool = True
    """True: x' = x + W_dec (z' - z) keeps the SAE's reconstruction error; false: x' = dec(z')."""
    null_draws: Annotated[int, Field(ge=1)] = 20
    """Seeded draws per random strategy (random latent sets, random directions): the null
    distribution a class set's, the global set's or a control's effect is compared with."""
    accuracy_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Headline rule: per class, the alpha with the lowest head usage whose accuracy is at least
    the unsteered accuracy minus this."""
    select_on: Literal["val", "test"] = "val"
    """Split on which the headline rule chooses each class's alpha; the headline is always
    reported on test. `test` chooses and reports on the same images (selection inflates it)."""
    bootstrap: Annotated[int, Field(ge=0)] = 1000
    """Bootstrap resamples (images resampled within each class, seeded by `seed`) for the
    intervals of the headline and the strategy curves; 0 reports no intervals."""
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    """Coverage of the bootstrap intervals and of the null's central interval."""
    top_classes: Annotated[int, Field(ge=1)] = 5
    """Classes listed in the headline (largest usage reduction first)."""
    head_index_base: Literal[0, 1] = 0
    """Printed head numbering: 0 gives h0..h(H-1), 1 gives h1..hH."""
    batch_size: Annotated[int, Field(ge=1)] = 256
    """Test images per batch."""
    seed: int = 0
    """Seed of the random latent sets (streams seed, seed + 1) and the random directions (seed + 2)."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    heads: HeadPath = "auto"
    """How the sweep runs the gated blocks (as `extract.heads`); recorded in the details."""
    blocks: Annotated[Literal["final", "all"] | list[int], BeforeValidator(_block_selection)] = "final"
    """Which gated blocks are steered: `final` (the paper's setting: the last block, its SAE
    models/sae), `all` (every gated block) or a list of block indices. Each steered block other
    than the final one needs its own SAE, trained by the `train_sae_block@<b>` stage for each b in
    `extract.layers`. With several blocks the headline rule minimises the mean usage over every
    gated block (affine in the model's GFLOPs), and `ceiling` searches the same blocks
    (docs/METHOD.md, section 8)."""

    @model_validator(mode="after")
    def _consistent(self) -> SteerParams:
        if not self.strategies:
            raise ValueError("strategies must name at least one of per_class, global, random")
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies has duplicates: {self.strategies}")
        if not self.alphas:
            raise ValueError("alphas must hold at least one value")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"alphas has duplicates: {self.alphas}")
        if self.mode == "scale" and min(self.alphas) < -1:
            raise ValueError(f"mode 'scale' needs alphas >= -1 (-1 ablates), got {min(self.alphas)}")
        return self
