"""`data.source: cifar100`: torchvision's CIFAR-100 download (md5-checked), cached under
`data.path` (default data/raw). Offline, a failed download says how to use a local copy."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.dataset import Record, SplitSource, encode_png, first_per_class, map_ordered
from pipeline.errors import PipelineError
from pipeline.params.data import DataParams

NAME = "cifar100"
DEFAULT_CACHE = Path("data/raw")

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


def open_split(data: DataParams, split: str, workers: int) -> SplitSource:
    """One split of torchvision's CIFAR-100, downloaded (md5-checked) into `data.path` or data/raw."""
    from torchvision.datasets import CIFAR100

    root = Path(data.path) if data.path is not None else DEFAULT_CACHE
    dataset = _cifar_dataset(root, train=split == "train")
    images: np.ndarray = dataset.data  # (N, 32, 32, 3) uint8
    labels = [int(t) for t in dataset.targets]
    keep = first_per_class(labels, data.max_per_class)
    height, width = images.shape[1:3]

    def encode(position: int) -> Record:
        png = encode_png(images[position])
        return Record(position, labels[position], png, (height, width), f"cifar100 {split}[{position}]")

    description = {"kind": "cifar100", "url": CIFAR100.url, "md5": CIFAR100.tgz_md5, "cache": str(root)}
    return SplitSource(list(dataset.classes), description, map_ordered(encode, keep, workers), len(keep))
