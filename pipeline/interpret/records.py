"""metrics/details/latent_stats.json: the firing statistics' summary, written by `latent_stats`
and read by `report` and `pipeline class` through `read_stats_record` alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.storage import read_dataclass, write_dataclass

OMIT = {"omit_none": True}


@dataclass(frozen=True)
class SplitSummary:
    """One split's statistics (the train split's sets; on test, also how far its own sets agree)."""

    overlap_global_vs_class: float
    """Mean over classes of |A ∩ B| / K between the global set and the class's set."""
    jaccard_global_vs_class: float
    alive_latents: int
    """Latents that fire at least once on the split."""
    alive_fraction: float
    mean_l0: float
    n_samples: int
    global_set_train_overlap: float | None = field(default=None, metadata=OMIT)
    """Test split only: |A_train ∩ A_test| / K of the global set."""
    class_set_train_overlap: float | None = field(default=None, metadata=OMIT)
    """Test split only: the same, averaged over the class sets."""


@dataclass(frozen=True)
class RelatedClass:
    name: str = field(metadata={"json": "class"})
    overlap: float
    jaccard: float


@dataclass(frozen=True)
class StatsRecord(SplitSummary):
    """The train split's summary plus the test split's, the class-by-class overlap and, per
    class, the classes whose top sets overlap its own most."""

    test: SplitSummary | None = None
    class_overlap_offdiag_mean: float = 0.0
    related: dict[str, list[RelatedClass]] = field(default_factory=dict)
    top_k: int = 0
    n_latents: int = 0
    n_classes: int = 0


def write_stats_record(path: Path | str, record: StatsRecord) -> None:
    write_dataclass(path, record)


def read_stats_record(path: Path | str) -> StatsRecord:
    return read_dataclass(StatsRecord, path, rerun="latent_stats")
