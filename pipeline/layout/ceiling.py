"""`ceiling` writes what class-specific fixed final-block patterns reach (pipeline.steering.ceiling)."""

from pathlib import Path

from pipeline.layout import download, extract, finetune

CEILING = Path("data/ceiling")
PATTERNS = CEILING / "patterns.parquet"
"""One row per (split, class, pattern): kept heads, usage, images, accuracy."""
CLASSES = CEILING / "classes.parquet"
"""One row per class: the pattern the rule chose on the selection split and its test outcome."""
BLOCKS = CEILING / "blocks.parquet"
"""Only when `steer.blocks` is not the final block alone: the ceiling across blocks, one row per
(split, configuration, class): own gates, each searched block's single-block ceiling, the
multi-block ceiling; accuracy, GFLOPs, usage per gated block, kept heads per searched block."""
METRICS = Path("metrics/ceiling.json")
"""Headline numbers only: the mean usage reduction the final-block ceiling reaches (test split);
across blocks also the multi-block ceiling's GFLOPs drop (a fraction) and accuracy change."""
DETAILS = Path("metrics/details/ceiling.json")
"""The summary with intervals, settings, per-split baselines, each class's Pareto frontier
(and, across blocks, the `blocks` section)."""

READS = (download.DATASET, extract.EMBEDDINGS, finetune.MODEL)
WRITES = (CEILING, METRICS, DETAILS)
