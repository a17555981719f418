"""Data sources and the canonical image data set every later stage reads.

Layout of data/dataset/{train,test}.parquet (written by the `download` stage):

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

Sources (`data.source`):
- `synthetic`: generated classes that are combinations of shape, colour and texture.
- `imagefolder`: a `ROOT/{train,test}/CLASS/*.png|jpg|jpeg` tree.
- `cifar100`: torchvision's CIFAR-100 download (md5-checked), cached under `data.path`.
"""

from __future__ import annotations

import io
import logging
import os
import urllib.error
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline.io import PipelineError, parquet_writer, read_table, with_metadata
from pipeline.params import DataParams, SyntheticParams
from pipeline.progress import progress

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
DATASET_DIR = Path("data/dataset")
ROW_GROUP_SIZE = 1024
PNG_COMPRESS_LEVEL = 6
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_CIFAR_CACHE = Path("data/raw")

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


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _map_ordered(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` on a thread pool, in order, one chunk at a time (bounded memory).

    Threads pay off because PIL's decoders and zlib release the GIL.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in _chunks(items, ROW_GROUP_SIZE):
            yield from pool.map(fn, chunk)


def _default_workers() -> int:
    return min(4, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------- synthetic
SHAPES = ("circle", "square", "triangle", "ring")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.15, 0.30, 0.90),
    "yellow": (0.90, 0.80, 0.10),
}
TEXTURES = ("solid", "stripes", "dots")

# The first classes, chosen by hand so that every colour, shape and texture is shared by
# several classes and no single attribute identifies a class: classes 0 and 1 (a red solid
# disc and a red solid ring, "plate" and "bowl") differ only in shape, so even two classes are
# not separable by mean colour. The remaining combinations follow in a fixed order.
_FIRST_CLASSES = (
    ("red", "circle", "solid"),
    ("red", "ring", "solid"),
    ("blue", "circle", "stripes"),
    ("blue", "square", "solid"),
    ("green", "triangle", "solid"),
    ("green", "square", "dots"),
    ("yellow", "ring", "stripes"),
    ("yellow", "triangle", "dots"),
    ("red", "square", "stripes"),
    ("blue", "ring", "dots"),
)
# Fields of the per-image parameter vector (uniform [0, 1) draws), in draw order.
_P_RADIUS, _P_CX, _P_CY, _P_ROT, _P_BG, _P_BG_JITTER = 0, 1, 2, 3, 4, 5  # jitter: 3 values
_P_COLOUR_JITTER = 8  # 3 values
_P_STRIPE_ANGLE, _P_PHASE1, _P_PHASE2 = 11, 12, 13
_N_PARAMS = 14
_SPLIT_CODE = {"train": 0, "test": 1}
# Bumped whenever the generator's output changes, so that old and new data sets differ in their
# metadata too.
SYNTHETIC_VERSION = 1


def synthetic_classes(num_classes: int) -> list[tuple[str, str, str]]:
    """(colour, shape, texture) of each class, in label order."""
    rest = [
        (colour, shape, texture)
        for shape in SHAPES
        for colour in COLOURS
        for texture in TEXTURES
        if (colour, shape, texture) not in _FIRST_CLASSES
    ]
    combos = list(_FIRST_CLASSES) + rest
    if num_classes > len(combos):
        raise PipelineError(f"synthetic: at most {len(combos)} classes exist, asked for {num_classes}")
    return combos[:num_classes]


def synthetic_class_names(num_classes: int) -> list[str]:
    """Names like `red_circle_solid`."""
    return ["_".join(combo) for combo in synthetic_classes(num_classes)]


def _image_rng(seed: int, split: str, label: int, j: int) -> np.random.Generator:
    # One generator per image, keyed by (class, position within class): an image does not
    # change when the number of classes or images per class changes, and subsampling keeps
    # exactly the first images.
    return np.random.default_rng([SYNTHETIC_VERSION, int(seed < 0), abs(seed), _SPLIT_CODE[split], label, j])


def render_synthetic(
    classes: Sequence[tuple[str, str, str]],
    labels: np.ndarray,
    params: np.ndarray,
    noise: np.ndarray,
    size: int,
) -> np.ndarray:
    """Draw a batch of images, vectorised over the batch with coordinate grids.

    (B,) labels into `classes`, (B, _N_PARAMS) uniform draws in [0, 1) (placement, size,
    rotation, tints, texture phases), (B, size, size, 3) pixel noise already scaled by the noise
    level -> (B, size, size, 3) uint8 images."""
    b = len(labels)
    col = lambda v: v.reshape(b, 1, 1)  # noqa: E731 - per-image scalar broadcast over pixels
    shape_id = np.array([SHAPES.index(classes[k][1]) for k in labels])
    texture_id = np.array([TEXTURES.index(classes[k][2]) for k in labels])
    base_colour = np.array([COLOURS[classes[k][0]] for k in labels])

    # Shape radius 22-40% of the side (diameter 44-80%), centred so that it stays inside.
    r = (0.22 + 0.18 * params[:, _P_RADIUS]) * size
    cx = r + (size - 2 * r) * params[:, _P_CX]
    cy = r + (size - 2 * r) * params[:, _P_CY]
    theta = 2 * np.pi * params[:, _P_ROT]
    grid = np.arange(size) + 0.5
    u = grid[None, None, :] - col(cx)  # (B, 1, W)
    v = grid[None, :, None] - col(cy)  # (B, H, 1)
    cos_t, sin_t = col(np.cos(theta)), col(np.sin(theta))
    ur, vr = u * cos_t + v * sin_t, -u * sin_t + v * cos_t  # rotated coordinates, (B, H, W)
    dist = np.hypot(u, v)
    rr = col(r)

    # Signed distance to each shape's edge (positive inside), in pixels.
    sdf_circle = rr - dist
    sdf_square = 0.8 * rr - np.maximum(np.abs(ur), np.abs(vr))
    edges = [np.cos(a) * ur + np.sin(a) * vr for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
    sdf_triangle = 0.575 * rr - np.maximum(np.maximum(edges[0], edges[1]), edges[2])  # circumradius 1.15 r
    sdf_ring = np.minimum(rr - dist, dist - 0.5 * rr)
    sdf = np.choose(col(shape_id), [sdf_circle, sdf_square, sdf_triangle, sdf_ring])
    mask = np.clip(sdf + 0.5, 0.0, 1.0)  # one pixel of anti-aliasing

    # Texture: 1 where the shape shows its full colour, 0 where it shows a dark version.
    period = size / 6.0
    phi = np.pi * params[:, _P_STRIPE_ANGLE]
    phase1, phase2 = 2 * np.pi * params[:, _P_PHASE1], 2 * np.pi * params[:, _P_PHASE2]
    along = u * col(np.cos(phi)) + v * col(np.sin(phi))
    stripes = np.clip(0.5 + 1.5 * np.sin(2 * np.pi * along / period + col(phase1)), 0.0, 1.0)
    lattice = np.cos(2 * np.pi * u / period + col(phase1)) * np.cos(2 * np.pi * v / period + col(phase2))
    dots = np.clip((lattice - 0.4) * 4.0, 0.0, 1.0)
    pattern = np.choose(col(texture_id), [np.ones_like(stripes), stripes, dots])

    background = 0.1 + 0.8 * params[:, _P_BG, None] + 0.16 * (params[:, _P_BG_JITTER : _P_BG_JITTER + 3] - 0.5)
    colour = base_colour + 0.16 * (params[:, _P_COLOUR_JITTER : _P_COLOUR_JITTER + 3] - 0.5)
    fill = (0.3 + 0.7 * pattern)[..., None] * colour[:, None, None, :]
    m = mask[..., None]
    image = background[:, None, None, :] * (1 - m) + fill * m + noise
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _synthetic_split(data: DataParams, split: str) -> SplitSource:
    syn: SyntheticParams = data.synthetic
    classes = synthetic_classes(syn.num_classes)
    full_per_class = syn.train_per_class if split == "train" else syn.test_per_class
    per_class = min(full_per_class, data.max_per_class or full_per_class)
    k = syn.num_classes
    # Classes interleaved (row i has label i % K): the first N per class are the first N*K rows.
    count = per_class * k
    description = {
        "kind": "synthetic",
        "version": SYNTHETIC_VERSION,
        "seed": data.seed,
        **syn.model_dump(),
    }
    records = _synthetic_records(classes, data.seed, syn, split, count)
    return SplitSource(synthetic_class_names(k), description, records, count)


def _synthetic_records(
    classes: Sequence[tuple[str, str, str]], seed: int, syn: SyntheticParams, split: str, count: int
) -> Iterator[Record]:
    k, size = len(classes), syn.image_size
    batch = max(1, 2**20 // (size * size))  # bounded memory whatever the image size
    for start in range(0, count, batch):
        idx = np.arange(start, min(start + batch, count))
        labels = idx % k
        params = np.empty((len(idx), _N_PARAMS))
        noise = np.empty((len(idx), size, size, 3))
        for row, i in enumerate(idx):
            rng = _image_rng(seed, split, int(labels[row]), int(i // k))
            params[row] = rng.random(_N_PARAMS)
            noise[row] = rng.standard_normal((size, size, 3))
        images = render_synthetic(classes, labels, params, noise * syn.noise, size)
        for row, i in enumerate(idx):
            yield Record(int(i), int(labels[row]), encode_png(images[row]), (size, size), f"synthetic {split}[{i}]")


# -------------------------------------------------------------------------------- imagefolder
def imagefolder_classes(root: Path) -> list[str]:
    """Class folder names shared by `root/train` and `root/test`, sorted; clear errors otherwise."""
    if not root.is_dir():
        raise PipelineError(f"imagefolder: data.path {root} is not a directory (expected {root}/train/CLASS/*.png)")
    found = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise PipelineError(f"imagefolder: {folder} missing (expected {root}/{{train,test}}/CLASS/*.png)")
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise PipelineError(f"imagefolder: {folder} holds no class folders (expected {folder}/CLASS/*.png)")
        found[split] = names
    if found["train"] != found["test"]:
        only_train = sorted(set(found["train"]) - set(found["test"]))
        only_test = sorted(set(found["test"]) - set(found["train"]))
        raise PipelineError(
            f"imagefolder: train and test have different class folders under {root} "
            f"(only in train: {only_train[:5]}; only in test: {only_test[:5]})"
        )
    return found["train"]


def imagefolder_files(root: Path, split: str, class_names: Sequence[str]) -> list[tuple[Path, int]]:
    """(file, label) of a split in source order: classes sorted, files sorted by name."""
    files = []
    for label, name in enumerate(class_names):
        folder = root / split / name
        images = sorted(
            (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=lambda p: p.name,
        )
        if not images:
            raise PipelineError(f"imagefolder: {folder} holds no images (*.png, *.jpg, *.jpeg)")
        files += [(p, label) for p in images]
    return files


def _load_image_file(path: Path) -> tuple[bytes, tuple[int, int]]:
    """Read and fully decode one image file; PNG bytes (as-is when already an RGB PNG)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a full decode: catches truncated or corrupt files
            size = (img.height, img.width)
            if img.format == "PNG" and img.mode == "RGB":
                return data, size
            return encode_png(np.asarray(img.convert("RGB"))), size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise PipelineError(f"imagefolder: {path} cannot be read as an image ({exc})") from None


def _imagefolder_split(data: DataParams, split: str, workers: int) -> SplitSource:
    assert data.path is not None  # guaranteed by DataParams' validator
    root = Path(data.path)
    class_names = imagefolder_classes(root)
    files = imagefolder_files(root, split, class_names)
    keep = first_per_class([label for _, label in files], data.max_per_class)

    def load(position: int) -> Record:
        path, label = files[position]
        png, size = _load_image_file(path)
        return Record(position, label, png, size, str(path))

    description = {"kind": "imagefolder", "path": str(data.path)}
    return SplitSource(class_names, description, _map_ordered(load, keep, workers), len(keep))


# ----------------------------------------------------------------------------------- cifar100
def _cifar_dataset(root: Path, train: bool) -> Any:
    """torchvision's CIFAR100 with download=True (md5-checked); failures as PipelineErrors."""
    from torchvision.datasets import CIFAR100

    archive = root / CIFAR100.filename
    local_copy = (
        f"Use a local copy instead: put {CIFAR100.filename} (md5 {CIFAR100.tgz_md5}) in {root}/, "
        "or set `data.source: imagefolder` with `data.path` pointing to a "
        "train/CLASS/*.png + test/CLASS/*.png tree."
    )
    try:
        return CIFAR100(root=str(root), train=train, download=True)
    except urllib.error.URLError as exc:
        reason = getattr(exc, "reason", exc)
        raise PipelineError(
            f"cifar100: downloading {CIFAR100.url} failed ({reason}); no network? {local_copy}"
        ) from None
    except RuntimeError as exc:
        # torchvision's wording for a checksum mismatch of the archive or an extracted file
        raise PipelineError(
            f"cifar100: checksum mismatch ({exc}): {archive} or its extracted files under "
            f"{root / CIFAR100.base_folder} are not the official CIFAR-100 (expected archive md5 "
            f"{CIFAR100.tgz_md5}). Delete them to download again. {local_copy}"
        ) from None
    except OSError as exc:
        raise PipelineError(f"cifar100: downloading or extracting into {root} failed ({exc}). {local_copy}") from None


def _cifar_split(data: DataParams, split: str, workers: int) -> SplitSource:
    from torchvision.datasets import CIFAR100

    root = Path(data.path) if data.path is not None else DEFAULT_CIFAR_CACHE
    dataset = _cifar_dataset(root, train=split == "train")
    images: np.ndarray = dataset.data  # (N, 32, 32, 3) uint8
    labels = [int(t) for t in dataset.targets]
    keep = first_per_class(labels, data.max_per_class)
    height, width = images.shape[1:3]

    def encode(position: int) -> Record:
        png = encode_png(images[position])
        return Record(position, labels[position], png, (height, width), f"cifar100 {split}[{position}]")

    description = {"kind": "cifar100", "url": CIFAR100.url, "md5": CIFAR100.tgz_md5, "cache": str(root)}
    return SplitSource(list(dataset.classes), description, _map_ordered(encode, keep, workers), len(keep))


# ---------------------------------------------------------------------------------- the set
def open_source(data: DataParams, split: str, workers: int | None = None) -> SplitSource:
    """One split of `data.source`, its records produced lazily in source order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    workers = _default_workers() if workers is None else workers
    if data.source == "synthetic":
        return _synthetic_split(data, split)
    if data.source == "imagefolder":
        return _imagefolder_split(data, split, workers)
    if data.source == "cifar100":
        return _cifar_split(data, split, workers)
    raise ValueError(f"unknown data source {data.source!r}")


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


def build_dataset(data: DataParams, out_dir: Path | str, workers: int | None = None) -> dict[str, Any]:
    """Write `out_dir/{train,test}.parquet` from `data`; return the summary for metrics/dataset.json.

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
    summary["num_classes"] = len(summary["class_names"])
    summary["image_size"] = train["image_size"]
    return summary


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

    for _ in _map_ordered(decode, range(n), num_workers):
        pass
    return ImageSet(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.from_numpy(labels),
        index=torch.from_numpy(table.column("index").to_numpy().astype(np.int64)),
        class_names=class_names,
        meta=meta,
    )
