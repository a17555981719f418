"""`stats`: latent firing statistics and top sets (read by `latent_stats` only)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from pipeline.params.base import Section


class StatsParams(Section):
    """`latent_stats`: which latents fire for which class."""

    top_k: Annotated[int, Field(ge=1)] = 16
    """Size of the most-frequent latent sets (one global, one per class)."""
    related: Annotated[int, Field(ge=1)] = 3
    """For each class, how many most-overlapping classes to list."""
    batch_size: Annotated[int, Field(ge=1)] = 4096
    """Embeddings encoded per step."""
