"""`data.source: synthetic`: the offline demo, generated classes that are combinations of shape,
colour and texture (so related classes share attributes, as bowl and plate do)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from pipeline.data.dataset import Record, SplitSource, encode_png
from pipeline.errors import PipelineError
from pipeline.params.data import DataParams, SyntheticParams

NAME = "synthetic"

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


def open_split(data: DataParams, split: str, workers: int) -> SplitSource:
    """One split of the synthetic set (rendered in vectorised batches; `workers` unused)."""
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
