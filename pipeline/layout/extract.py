"""`extract` writes the embeddings table (pipeline.data.embeddings)."""

from pathlib import Path

from pipeline.layout import download, finetune

EMBEDDINGS = Path("data/embeddings")
"""`train.parquet`, `test.parquet`."""
DETAILS = Path("metrics/details/extract.json")
"""Rows, width, the model's hash, and accuracy and usage recomputed from the stored rows (a
check against finetune's, not a headline: no metric of its own)."""

READS = (download.DATASET, finetune.MODEL, finetune.DETAILS)
WRITES = (EMBEDDINGS, DETAILS)


def embeddings_split(split: str) -> Path:
    return EMBEDDINGS / f"{split}.parquet"
