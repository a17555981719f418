"""`extract`: storing the final block's CLS input (read by `extract` only)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from pipeline.params.base import Device, HeadPath, Section


class ExtractParams(Section):
    """`extract`: CLS residual inputs and gate decisions of every image, into Parquet."""

    batch_size: Annotated[int, Field(ge=1)] = 256
    """Images per forward pass (and per Parquet row group)."""
    layers: list[Annotated[int, Field(ge=0)]] = []
    """Extra blocks whose CLS input is stored too (column `x_block<i>`); the final block's
    input is always stored as `x`."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    heads: HeadPath = "auto"
    """`masked`, `skipping` (compute only the kept heads) or `auto` (skipping on a CPU, masked on
    a GPU); the path taken is recorded in the embeddings' metadata. Outputs agree to ~1e-6, not
    bit for bit, so the choice is part of what makes the stored bytes."""
    nproc: Annotated[int, Field(ge=1)] = 1
    """Processes per node; above 1 the stage runs under torchrun, every process extracting an
    interleaved share of the batches, and rank 0 merges the shares into files byte-identical
    to a single-process run."""
