"""`download` writes the canonical image data set (pipeline.data.dataset)."""

from pathlib import Path

DATASET = Path("data/dataset")
"""`train.parquet`, `test.parquet`."""
SUMMARY = Path("metrics/dataset.json")
"""Counts per class and split: a description, kept out of `dvc metrics`."""

READS: tuple[Path, ...] = ()
WRITES = (DATASET, SUMMARY)


def dataset_split(split: str) -> Path:
    return DATASET / f"{split}.parquet"
