"""`data.source: huggingface`: a data set of Hugging Face's `datasets` library, either saved on
disk (`data.path`, written by `save_to_disk`; offline) or loaded from the hub by name
(`data.huggingface.name`, optionally pinned to a `revision`; `datasets` caches the download).

The image and label columns are params; the class names come from the label column's
`ClassLabel` feature. CIFAR-100 on the hub is `uoft-cs/cifar100` with splits `train` and
`test`, images in `img` and labels in `fine_label` (docs/EXPERIMENTS.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.dataset import Record, SplitSource, encode_png, first_per_class, map_ordered
from pipeline.data.sources import IMAGE_ERRORS, rgb_png
from pipeline.errors import ParamsError, PipelineError
from pipeline.params.data import DataParams

NAME = "huggingface"


def _split_name(data: DataParams, split: str) -> tuple[str, str]:
    """(the data set's split name, the params key that named it) for the pipeline's split."""
    if split == "train":
        return data.huggingface.train_split, "data.huggingface.train_split"
    return data.huggingface.test_split, "data.huggingface.test_split"


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise PipelineError("data.source 'huggingface' needs the `datasets` library: pip install -e '.[hf]'") from None
    return datasets


def load_split(data: DataParams, split: str) -> Any:
    """The `datasets.Dataset` of one split, with its images left undecoded."""
    datasets = _datasets()

    hf = data.huggingface
    name, key = _split_name(data, split)
    if data.path is not None:
        try:
            saved = datasets.load_from_disk(str(data.path))
        except FileNotFoundError as exc:
            raise PipelineError(f"huggingface: data.path {data.path} holds no data set saved with save_to_disk ({exc})") from None
        if isinstance(saved, datasets.Dataset):
            raise ParamsError(f"data.path {data.path}: a single saved Dataset; save a DatasetDict with the "
                              f"splits {hf.train_split!r} and {hf.test_split!r}")
        if name not in saved:
            raise ParamsError(f"{key} = {name!r}: not a split of {data.path} (it has {sorted(saved)})")
        dataset = saved[name]
        where = str(data.path)
    else:
        try:
            dataset = datasets.load_dataset(hf.name, split=name, revision=hf.revision)
        except ValueError as exc:  # datasets' wording for an unknown split
            raise ParamsError(f"{key} = {name!r}: {exc}") from None
        except (ConnectionError, OSError) as exc:
            raise PipelineError(
                f"huggingface: loading {hf.name!r} from the hub failed ({exc}); no network? Save it once "
                "where there is one (`datasets.load_dataset(...).save_to_disk(DIR)`) and set `data.path: DIR`."
            ) from None
        where = hf.name
    for column, column_key in ((hf.image_column, "data.huggingface.image_column"),
                               (hf.label_column, "data.huggingface.label_column")):
        if column not in dataset.column_names:
            raise ParamsError(f"{column_key} = {column!r}: no such column in {where} [{name}] "
                              f"(its columns: {dataset.column_names})")
    if isinstance(dataset.features[hf.image_column], datasets.Image):
        dataset = dataset.cast_column(hf.image_column, datasets.Image(decode=False))
    return dataset


def class_names_of(dataset: Any, data: DataParams) -> list[str]:
    datasets = _datasets()

    feature = dataset.features[data.huggingface.label_column]
    if not isinstance(feature, datasets.ClassLabel):
        raise ParamsError(f"data.huggingface.label_column = {data.huggingface.label_column!r}: a "
                          f"{type(feature).__name__} column, not a ClassLabel, so it has no class names")
    return list(feature.names)


def _png(value: Any, where: str) -> tuple[bytes, tuple[int, int]]:
    """PNG bytes and (H, W) of one image cell: {'bytes', 'path'} (an undecoded Image), raw bytes,
    or a PIL image; as-is when already an RGB PNG."""
    if isinstance(value, Image.Image):
        return encode_png(np.asarray(value.convert("RGB"))), (value.height, value.width)
    raw = value.get("bytes") if isinstance(value, dict) else value
    if raw is None and isinstance(value, dict) and value.get("path"):
        raw = Path(value["path"]).read_bytes()
    if not isinstance(raw, bytes | bytearray):
        raise PipelineError(f"huggingface: {where} is not an image ({type(value).__name__})")
    try:
        return rgb_png(bytes(raw))
    except IMAGE_ERRORS as exc:
        raise PipelineError(f"huggingface: {where} cannot be read as an image ({exc})") from None


def open_split(data: DataParams, split: str, workers: int) -> SplitSource:
    """One split of the `datasets` data set, in its row order."""
    dataset = load_split(data, split)
    hf = data.huggingface
    class_names = class_names_of(dataset, data)
    labels = [int(label) for label in dataset[hf.label_column]]
    if any(not 0 <= label < len(class_names) for label in labels):
        raise PipelineError(f"huggingface: {hf.label_column} has labels outside 0..{len(class_names) - 1}")
    keep = first_per_class(labels, data.max_per_class)
    images = dataset.select_columns([hf.image_column])
    name, _ = _split_name(data, split)

    def load(position: int) -> Record:
        where = f"{name}[{position}].{hf.image_column}"
        png, size = _png(images[position][hf.image_column], where)
        return Record(position, labels[position], png, size, f"huggingface {where}")

    description = {"kind": "huggingface", "name": hf.name if data.path is None else None,
                   "revision": hf.revision, "path": str(data.path) if data.path is not None else None,
                   "split": name, "fingerprint": getattr(dataset, "_fingerprint", None)}
    return SplitSource(class_names, description, map_ordered(load, keep, workers), len(keep))
