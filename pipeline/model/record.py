"""metrics/details/finetune.json: what `finetune` measured of the model it trained, written by
`finetune` and read by `extract` (a consistency check), `steer` (the FLOPs of the earlier
blocks) and `report`, through `read_record` alone. Kept apart from the training loop, so that
its readers do not depend on the loop's code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.storage import read_dataclass, write_dataclass

OMIT = {"omit_none": True}


@dataclass(frozen=True)
class TrainingRecord:
    test_accuracy: float
    head_usage: float
    """Final-block head usage on the test split (eval gates)."""
    head_usage_per_block: list[float]
    """Every block's usage on the test split; blocks before `keep_layers` are never gated (1.0)."""
    head_usage_per_head: list[float]
    """The final block's keep rate of each head on the test split."""
    epochs: int
    num_classes: int
    gflops: float | None = field(default=None, metadata=OMIT)
    """Matmul GFLOPs per test image that the gates leave (`pipeline.model.flops`); None in a
    record written before the FLOP count existed."""
    gflops_dense: float | None = field(default=None, metadata=OMIT)
    """What the masked path computes for every image (all heads)."""
    gflops_fraction: float | None = field(default=None, metadata=OMIT)
    gflops_per_head: list[float] | None = field(default=None, metadata=OMIT)
    gflops_fixed: float | None = field(default=None, metadata=OMIT)


def write_record(path: Path | str, record: TrainingRecord) -> None:
    write_dataclass(path, record)


def read_record(path: Path | str) -> TrainingRecord:
    return read_dataclass(TrainingRecord, path, rerun="finetune")
