"""`interpret`: galleries, purity baselines and head attribution (read by `interpret`; `report` reads its figure sizes)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from pipeline.params.base import Section


class InterpretParams(Section):
    """`interpret`: what each latent responds to and which heads it moves."""

    top_n: Annotated[int, Field(ge=1)] = 16
    """Images kept per latent in its gallery: the training images it activates most on."""
    batch_size: Annotated[int, Field(ge=1)] = 4096
    """Embeddings encoded per step of the streaming pass."""
    grid_latents: Annotated[int, Field(ge=1)] = 16
    """Latents of the global set drawn in metrics/plots/latent_grid.png (most frequent first)."""
    grid_images: Annotated[int, Field(ge=1)] = 8
    """Thumbnails per latent in the grids and the class cards (at most `top_n`)."""
    card_latents: Annotated[int, Field(ge=1)] = 3
    """Latents shown per class card in the report: the class set's most frequent."""
    baseline_seed: int = 0
    """Seed of the random directions and of their pairing with SAE latents' firing rates
    (the purity baselines)."""

    @model_validator(mode="after")
    def _grid_within_gallery(self) -> InterpretParams:
        if self.grid_images > self.top_n:
            raise ValueError(f"interpret.grid_images ({self.grid_images}) must be <= interpret.top_n ({self.top_n})")
        return self
