"""What every parameter section shares: the strict pydantic base and the literal types that
several sections use.

Kept apart from the sections so that each section's module is a DVC dependency of exactly the
stages that read it: editing `steer.py` here reruns `steer` and `report`, never `finetune`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Device = Literal["auto", "cpu", "cuda"]
"""`auto` picks CUDA when present."""
HeadPath = Literal["auto", "masked", "skipping"]
"""How eval forwards run the gated blocks: `masked` computes every head and zeroes the dropped
ones, `skipping` computes only the kept heads (grouped by gate pattern; outputs equal up to
float rounding), `auto` skips on a CPU and masks on a GPU (BENCHMARKS.md, "Inference with
pruned heads", has the measurements behind that default)."""


class Section(BaseModel):
    """A `params.yaml` section: unknown keys are errors, values are frozen, and every field's
    docstring is its documentation."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
