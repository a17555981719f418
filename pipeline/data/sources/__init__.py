"""Where images come from: one module per source, found by name.

A source is a module in this package with
- `NAME`: the value of `data.source` that selects it;
- `open_split(data: DataParams, split: str, workers: int) -> SplitSource`: one split's class
  names, a description and its records, in source order (`pipeline.data.dataset` writes them).

Adding a source is one new file here plus its parameters in `pipeline/params/data.py` (its name in
`DataParams.source` and, if it needs any, a section of its own). `dvc.yaml` lists this
directory as a dependency of `download` only: a new or edited source reruns `download`, and
the stages that read the data set rerun only if its bytes change.
"""

from __future__ import annotations

import importlib
import io
import logging
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.dataset import (
    SPLITS,
    SplitSource,
    carve_validation,
    default_workers,
    encode_png,
    split_path,
    split_summary,
    write_split,
)
from pipeline.errors import PipelineError
from pipeline.params.data import DataParams

log = logging.getLogger(__name__)

OpenSplit = Callable[[DataParams, str, int], SplitSource]

IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What `rgb_png` raises for bytes that are not a readable image."""


def rgb_png(data: bytes) -> tuple[bytes, tuple[int, int]]:
    """One encoded image, fully decoded (catches truncated or corrupt files): its PNG bytes (as-is
    when already an RGB PNG, else re-encoded as RGB) and (H, W). For the sources' own loaders."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        size = (img.height, img.width)
        if img.format == "PNG" and img.mode == "RGB":
            return bytes(data), size
        return encode_png(np.asarray(img.convert("RGB"))), size


def registry(path: list[str] | None = None, package: str = __name__) -> dict[str, OpenSplit]:
    """Every source module of this package (or of the package `package` at `path`), by NAME."""
    found: dict[str, OpenSplit] = {}
    for info in sorted(pkgutil.iter_modules(__path__ if path is None else path), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{info.name}")
        name, open_split = getattr(module, "NAME", None), getattr(module, "open_split", None)
        if name is None or open_split is None:
            raise TypeError(f"{module.__name__}: a source module needs NAME and open_split()")
        if name in found:
            raise TypeError(f"{module.__name__}: source name {name!r} is taken")
        found[name] = open_split
    return found


def open_source(data: DataParams, split: str, workers: int | None = None) -> SplitSource:
    """One split of `data.source`, its records produced lazily in source order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    sources = registry()
    if data.source not in sources:
        raise ValueError(f"unknown data source {data.source!r} (known: {sorted(sources)})")
    return sources[data.source](data, split, default_workers() if workers is None else workers)


def build_dataset(data: DataParams, out_dir: Path | str, workers: int | None = None) -> dict[str, Any]:
    """Write `out_dir/{train,val,test}.parquet` from `data`; return the summary for
    metrics/dataset.json. The validation split is carved out of the source's training split.

    Writes into `out_dir` directly: callers wanting all-or-nothing pass a temporary directory.
    """
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"source": data.source, "splits": {}}
    for split in SPLITS:
        source = open_source(data, split, workers)
        log.info("writing %s split (%d images) from %s", split, source.count, data.source)
        summary["splits"][split] = write_split(split_path(out_dir, split), source, split, data.max_per_class)
        summary["class_names"] = source.class_names
    train, test = summary["splits"]["train"], summary["splits"]["test"]
    if train["image_size"] != test["image_size"]:
        raise PipelineError(
            f"train images are {train['image_size']} (HxW) but test images are {test['image_size']}: "
            "all images of a data set must share one size"
        )
    if data.val_per_class:
        carve_validation(split_path(out_dir, "train"), split_path(out_dir, "val"), data.val_per_class, data.seed)
        for split in ("train", "val"):
            summary["splits"][split] = split_summary(split_path(out_dir, split))
    summary["num_classes"] = len(summary["class_names"])
    summary["image_size"] = train["image_size"]
    return summary


