"""`extract` writes the embeddings table (pipeline.embeddings)."""

from pathlib import Path

from pipeline.layout import download, finetune

EMBEDDINGS = Path("data/embeddings")
"""`train.parquet`, `test.parquet`."""
METRICS = Path("metrics/extract.json")

READS = (download.DATASET, finetune.MODEL, finetune.METRICS)
WRITES = (EMBEDDINGS, METRICS)


def embeddings_split(split: str) -> Path:
    return EMBEDDINGS / f"{split}.parquet"
