"""`latency`: what the steered models cost as deployed (read by `latency`; `report` prints it)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from pipeline.params.base import HeadPath, Section


class LatencyParams(Section):
    """`latency`: each policy (the model's own gates, the per-class steering headline as an
    oracle and as the deployable predicted-class policy, the ceiling's patterns) run as a
    deployed model would run it, block by block (`pipeline.steering.deploy`): its accuracy, head
    usage per block and GFLOPs per image (steering's own SAE matmuls and the predicted-class
    policy's extra pass counted apart), and, when `measure` is true, its CPU latency."""

    measure: bool = False
    """Time the policies (median of `rounds`, per batch size). Timings differ from run to run and
    machine to machine, so the default leaves them out and the run's outputs stay byte-identical;
    the report shows them when measured (`dvc exp run -S latency.measure=true`)."""
    images: Annotated[int, Field(ge=1)] = 256
    """This many test images, evenly spaced over the split (every class; all of them when the
    split is smaller), run every policy."""
    batch_sizes: list[Annotated[int, Field(ge=1)]] = [1, 32]
    """Batch sizes timed; each runs its full batches of the images."""
    rounds: Annotated[int, Field(ge=1)] = 5
    """Timed rounds per batch size (the policies alternate within a round), after one warm-up."""
    threads: Annotated[int, Field(ge=1)] | None = None
    """Torch CPU threads while timing (null: torch's default); recorded with the timings."""
    heads: HeadPath = "skipping"
    """The head path the policies run on: `skipping` computes only the kept heads (what the
    gates save in time), `masked` every head."""

    @field_validator("batch_sizes")
    @classmethod
    def _some(cls, sizes: list[int]) -> list[int]:
        if not sizes or len(set(sizes)) != len(sizes):
            raise ValueError(f"batch_sizes must be a non-empty list without duplicates, got {sizes}")
        return sizes
