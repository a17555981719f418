"""`download`: write the canonical data set data/dataset/{train,test}.parquet and
metrics/dataset.json from `data.source` (synthetic, imagefolder or cifar100)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.data import DATASET_DIR, build_dataset
from pipeline.io import atomic_path, clean_outputs, write_json
from pipeline.params import Params

log = logging.getLogger(__name__)

METRICS_PATH = Path("metrics/dataset.json")


def run(params: Params) -> None:
    clean_outputs(DATASET_DIR, METRICS_PATH)
    # Both splits go into a temporary directory that replaces data/dataset only when complete:
    # an error or a kill leaves the previous data set (or nothing), never half of one.
    with atomic_path(DATASET_DIR, directory=True) as tmp:
        summary = build_dataset(params.data, tmp)
    write_json(METRICS_PATH, summary)
    splits = summary["splits"]
    log.info(
        "data set: %d classes, %d train + %d test images of %dx%d -> %s",
        summary["num_classes"],
        splits["train"]["total"],
        splits["test"]["total"],
        *summary["image_size"],
        DATASET_DIR,
    )
