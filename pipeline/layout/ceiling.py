"""`ceiling` writes what class-specific fixed final-block patterns reach (pipeline.steering.ceiling)."""

from pathlib import Path

from pipeline.layout import download, extract, finetune

CEILING = Path("data/ceiling")
PATTERNS = CEILING / "patterns.parquet"
"""One row per (split, class, pattern): kept heads, usage, images, accuracy."""
CLASSES = CEILING / "classes.parquet"
"""One row per class: the pattern the rule chose on the selection split and its test outcome."""
METRICS = Path("metrics/ceiling.json")
"""Headline number only: the mean usage reduction the ceiling reaches (test split)."""
DETAILS = Path("metrics/details/ceiling.json")
"""The summary with intervals, settings, per-split baselines, each class's Pareto frontier."""

READS = (download.DATASET, extract.EMBEDDINGS, finetune.MODEL)
WRITES = (CEILING, METRICS, DETAILS)
