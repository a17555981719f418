"""`download`: write the canonical data set data/dataset/{train,test}.parquet and
metrics/dataset.json from `data.source` (any module of `pipeline/data/sources/`)."""

from __future__ import annotations

import logging

from pipeline.data.sources import build_dataset
from pipeline.layout import download as files
from pipeline.params.data import DataParams
from pipeline.storage import atomic_path, clean_outputs, write_json

log = logging.getLogger(__name__)


def run(data: DataParams) -> None:
    clean_outputs(*files.WRITES)
    # Both splits go into a temporary directory that replaces data/dataset only when complete:
    # an error or a kill leaves the previous data set (or nothing), never half of one.
    with atomic_path(files.DATASET, directory=True) as tmp:
        summary = build_dataset(data, tmp)
    write_json(files.SUMMARY, summary)
    splits = summary["splits"]
    log.info(
        "data set: %d classes, %d train + %d test images of %dx%d -> %s",
        summary["num_classes"],
        splits["train"]["total"],
        splits["test"]["total"],
        *summary["image_size"],
        files.DATASET,
    )
