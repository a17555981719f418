"""The canonical image data set every stage after `download` reads: its format, writer and reader.

Layout of data/dataset/{train,val,test}.parquet (written by the `download` stage from a source in
`pipeline/data/sources/`; `val` is a seeded, class-stratified part of the source's training split,
`data.val_per_class` images of every class, and absent when that is 0):

| column | type   | meaning                                                        |
|--------|--------|----------------------------------------------------------------|
| image  | binary | the image as PNG bytes (RGB, every image of the set one size)  |
| label  | int32  | class, an index into `class_names`                             |
| index  | int64  | position of the image within its source split (before          |
|        |        | `data.max_per_class` subsampling)                              |

Schema metadata (JSON values): `class_names` (list), `source` (what the images came from:
`kind` plus the path/URL or the synthetic generator's parameters), `split`, `image_size`
([H, W]), `max_per_class`.

Row groups hold `ROW_GROUP_SIZE` rows, and the files are written a row group at a time, so a
large source never needs all its PNG bytes in memory. Same parameters, same bytes.

A source hands the writer a `SplitSource`: its class names, a description, and its `Record`s
in source order. Nothing here knows where images come from, so the stages that only read the
data set (`finetune`, `extract`, `steer`) do not depend on any source's code.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.errors import ParamsError, PipelineError
from pipeline.progress import progress
from pipeline.storage import metadata_dict, parquet_writer, read_table, with_metadata

SPLITS = ("train", "test")
"""The splits a source provides; `download` carves `val` out of `train` (data.val_per_class)."""
ALL_SPLITS = ("train", "val", "test")
VALIDATION_STREAM = 7919
"""Keys the validation draw's random stream apart from any other use of `data.seed`."""
ROW_GROUP_SIZE = 1024
PNG_COMPRESS_LEVEL = 6

COLUMNS: dict[str, pa.DataType] = {"image": pa.binary(), "label": pa.int32(), "index": pa.int64()}

T = TypeVar("T")
R = TypeVar("R")


def split_path(directory: Path | str, split: str) -> Path:
    """`directory/<split>.parquet`: where a split of the canonical data set lives."""
    return Path(directory) / f"{split}.parquet"


class Record(NamedTuple):
    """One image on its way into the data set."""

    index: int
    label: int
    png: bytes
    size: tuple[int, int]
    """(H, W) of the decoded image."""
    name: str
    """Where it came from, for error messages (a file path, or `synthetic[i]`)."""


@dataclass(frozen=True)
class SplitSource:
    """One split of a source: its classes, a description, and its records in source order."""

    class_names: list[str]
    description: dict[str, Any]
    records: Iterator[Record]
    count: int
    """Number of records `records` yields (after max_per_class), for the progress bar."""


# ------------------------------------------------------------------------------------ helpers
def encode_png(array: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes; deterministic (fixed compression level, no metadata)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), "RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8 RGB array."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def first_per_class(labels: Sequence[int], max_per_class: int | None) -> list[int]:
    """Positions of the first `max_per_class` items of each label, in their original order."""
    if max_per_class is None:
        return list(range(len(labels)))
    seen: dict[int, int] = {}
    keep = []
    for position, label in enumerate(labels):
        if seen.get(label, 0) < max_per_class:
            seen[label] = seen.get(label, 0) + 1
            keep.append(position)
    return keep


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def map_ordered(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` on a thread pool, in order, one chunk at a time (bounded memory).

    Threads pay off because PIL's decoders and zlib release the GIL.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in chunks(items, ROW_GROUP_SIZE):
            yield from pool.map(fn, chunk)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------- writing
def dataset_schema(
    class_names: Sequence[str],
    source: dict[str, Any],
    split: str,
    image_size: tuple[int, int],
    max_per_class: int | None,
) -> pa.Schema:
    """The data set's Arrow schema with its JSON metadata."""
    meta = {
        "class_names": list(class_names),
        "source": source,
        "split": split,
        "image_size": list(image_size),
        "max_per_class": max_per_class,
    }
    return with_metadata(pa.schema([pa.field(name, dtype) for name, dtype in COLUMNS.items()]), meta)


def write_split(path: Path, source: SplitSource, split: str, max_per_class: int | None = None) -> dict[str, Any]:
    """Stream `source`'s records into `path`, a row group at a time; return the split's counts."""
    records = iter(progress(source.records, desc=f"{split} images", total=source.count, unit="img"))
    first = next(records, None)
    if first is None:
        raise PipelineError(f"{split}: the source holds no images")
    size = first.size
    schema = dataset_schema(source.class_names, source.description, split, size, max_per_class)
    counts = [0] * len(source.class_names)
    with parquet_writer(path, schema) as writer:
        batch: list[Record] = []
        for record in chain([first], records):
            if record.size != size:
                raise PipelineError(
                    f"{record.name} is {record.size[0]}x{record.size[1]} (HxW) but earlier images are "
                    f"{size[0]}x{size[1]}: all images of a data set must share one size (resize them first)"
                )
            counts[record.label] += 1
            batch.append(record)
            if len(batch) == ROW_GROUP_SIZE:
                _write_batch(writer, schema, batch)
                batch = []
        if batch:
            _write_batch(writer, schema, batch)
    return {
        "total": sum(counts),
        "image_size": list(size),
        "per_class": dict(zip(source.class_names, counts)),
    }


def _write_batch(writer: Any, schema: pa.Schema, batch: list[Record]) -> None:
    table = pa.table(
        {
            "image": pa.array([r.png for r in batch], pa.binary()),
            "label": pa.array([r.label for r in batch], pa.int32()),
            "index": pa.array([r.index for r in batch], pa.int64()),
        },
        schema=schema,
    )
    writer.write_table(table, row_group_size=ROW_GROUP_SIZE)


# ----------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ImageSet:
    """A split of the canonical data set in memory."""

    images: torch.Tensor
    """(N, 3, H, W) uint8."""
    labels: torch.Tensor
    """(N,) int64."""
    index: torch.Tensor
    """(N,) int64 position of each image within its source split."""
    class_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    """Schema metadata: class_names, source, split, image_size, max_per_class."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])


def load_images(path: Path | str, num_workers: int = 0) -> ImageSet:
    """Read a split written by `download`, decoding every PNG (on `num_workers` threads)."""
    path = Path(path)
    table, meta = read_table(path, COLUMNS)
    for key in ("class_names", "image_size"):
        if key not in meta:
            raise PipelineError(f"{path}: schema metadata lacks '{key}'; not written by `download`")
    class_names = list(meta["class_names"])
    height, width = meta["image_size"]
    n = table.num_rows
    if n == 0:
        raise PipelineError(f"{path}: holds no images")
    labels = table.column("label").to_numpy().astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise PipelineError(f"{path}: labels outside 0..{len(class_names) - 1}; the file is corrupt")
    blobs = table.column("image").to_pylist()
    images = np.empty((n, height, width, 3), dtype=np.uint8)

    def decode(row: int) -> None:
        try:
            pixels = decode_png(blobs[row])
        except (OSError, ValueError, SyntaxError) as exc:
            raise PipelineError(
                f"{path}: image in row {row} cannot be decoded ({exc}); rerun `pipeline download`"
            ) from None
        if pixels.shape != (height, width, 3):
            raise PipelineError(
                f"{path}: image in row {row} is {pixels.shape[0]}x{pixels.shape[1]}, metadata says "
                f"{height}x{width}; rerun `pipeline download`"
            )
        images[row] = pixels

    for _ in map_ordered(decode, range(n), num_workers):
        pass
    return ImageSet(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.from_numpy(labels),
        index=torch.from_numpy(table.column("index").to_numpy().astype(np.int64)),
        class_names=class_names,
        meta=meta,
    )


def read_images_at(path: Path | str, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode only the given rows of a split (the galleries need a few hundred images of a
    45,000-image split): ((len(rows), H, W, 3) uint8 images, their labels, the split's row count)."""
    path = Path(path)
    table, meta = read_table(path, COLUMNS)
    height, width = meta["image_size"]
    take = pa.array(np.asarray(rows, dtype=np.int64), type=pa.int64())
    blobs = table.column("image").take(take).to_pylist()
    out = np.empty((len(blobs), height, width, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        out[i] = decode_png(blob)
    return out, table.column("label").take(take).to_numpy().astype(np.int64), table.num_rows


def read_image_groups(path: Path | str, groups: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """`read_images_at` for several groups of rows (galleries) in one read: per group its
    images and labels, and the split's row count."""
    images, labels, n_rows = read_images_at(path, [r for group in groups for r in group])
    bounds = np.cumsum([0, *map(len, groups)])
    return ([images[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
            [labels[a:b] for a, b in zip(bounds[:-1], bounds[1:])], n_rows)


# ---------------------------------------------------------------------------- validation split
def validation_rows(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """(N,) bool: `per_class` rows of each class, drawn without replacement by a generator keyed
    by (seed, class), so a class's choice does not depend on the other classes."""
    chosen = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) <= per_class:
            raise ParamsError(
                f"data.val_per_class = {per_class}: class {int(label)} has only {len(rows)} training images "
                "(the validation split must leave some for training)"
            )
        pick = np.random.default_rng([VALIDATION_STREAM, seed & 0xFFFFFFFF, int(label)]).choice(len(rows), per_class, replace=False)
        chosen[rows[pick]] = True
    return chosen


def carve_validation(train_path: Path, val_path: Path, per_class: int, seed: int) -> None:
    """Move `per_class` images of every class from the written training split into a
    validation split (same schema, metadata `split: val`), streaming a row group at a time."""
    source = pq.ParquetFile(str(train_path))
    labels = source.read(columns=["label"]).column("label").to_numpy()
    to_val = validation_rows(labels, per_class, seed)
    meta = metadata_dict(source.schema_arrow)
    kept_path = train_path.with_name(f".{train_path.name}.carving")
    writers = {
        False: _Rechunker(kept_path, source.schema_arrow),
        True: _Rechunker(val_path, with_metadata(source.schema_arrow, {**meta, "split": "val"})),
    }
    start = 0
    for group in range(source.num_row_groups):
        table = source.read_row_group(group)
        mask = to_val[start : start + table.num_rows]
        start += table.num_rows
        for is_val, writer in writers.items():
            writer.add(table.filter(pa.array(mask == is_val)))
    for writer in writers.values():
        writer.close()
    kept_path.replace(train_path)


def split_summary(path: Path) -> dict[str, Any]:
    """Counts of a written split, as `write_split` returns them."""
    source = pq.ParquetFile(str(path))
    meta = metadata_dict(source.schema_arrow)
    labels = source.read(columns=["label"]).column("label").to_numpy()
    counts = np.bincount(labels, minlength=len(meta["class_names"]))
    return {"total": int(counts.sum()), "image_size": meta["image_size"],
            "per_class": {name: int(n) for name, n in zip(meta["class_names"], counts)}}


def available_splits(directory: Path | str) -> tuple[str, ...]:
    """The splits of the data set (or embeddings) in `directory`, in ALL_SPLITS order."""
    return tuple(split for split in ALL_SPLITS if split_path(directory, split).exists())


class _Rechunker:
    """Writes tables into full ROW_GROUP_SIZE row groups (the last one shorter)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.writer = parquet_writer(path, schema)
        self.schema = schema
        self.pending: list[pa.Table] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table.replace_schema_metadata(self.schema.metadata))
        self.rows += table.num_rows
        while self.rows >= ROW_GROUP_SIZE:
            self._flush(ROW_GROUP_SIZE)

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        self.writer.write_table(table.slice(0, n), row_group_size=ROW_GROUP_SIZE)
        rest = table.slice(n)
        self.pending, self.rows = [rest], rest.num_rows

    def close(self) -> None:
        if self.rows:
            self._flush(self.rows)
        self.writer.close()
