"""`ceiling`: the search for class-specific fixed final-block gate patterns (read by `ceiling`;
`report` prints it). Its headline rule's keys are `steer`'s (`select_on`, `accuracy_tolerance`,
`bootstrap`, `confidence`), so that one rule serves both."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipeline.params.base import Device, HeadPath, Section


class CeilingParams(Section):
    """`ceiling`: per class, every fixed final-block gate pattern (or a greedy search), and the
    headline rule applied to patterns instead of alphas: what class-specific pruning of the
    final block can reach, the yardstick for steering."""

    search: Literal["auto", "exhaustive", "greedy"] = "auto"
    """`exhaustive`: all 2^H patterns; `greedy`: per class, from all heads kept, drop the head
    whose removal keeps the selection-split accuracy highest while the rule still holds, until
    none can go (at most H^2 patterns); `auto`: exhaustive up to `max_exhaustive_heads` heads."""
    max_exhaustive_heads: Annotated[int, Field(ge=1, le=16)] = 12
    """`auto` searches exhaustively up to this many heads per block (2^12 = 4096 patterns)."""
    batch_size: Annotated[int, Field(ge=1)] = 256
    """Images per forward pass through the blocks before the final one."""
    seed: int = 0
    """Seed of the bootstrap resamples of the ceiling's intervals."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    heads: HeadPath = "auto"
    """How the blocks before the final one run (as `steer.heads`)."""
