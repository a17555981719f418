"""`data`: where the images come from (read by `download` only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.params.base import Section


class SyntheticParams(Section):
    """The offline demo data set: classes are combinations of shape, colour and texture."""

    num_classes: Annotated[int, Field(ge=2, le=48)] = 10
    """Number of classes (distinct shape x colour x texture combinations, at most 4*4*3 = 48)."""
    train_per_class: Annotated[int, Field(ge=1)] = 400
    """Training images per class."""
    test_per_class: Annotated[int, Field(ge=1)] = 100
    """Test images per class."""
    image_size: Annotated[int, Field(ge=16, le=256)] = 32
    """Side of the square RGB images, in pixels."""
    noise: Annotated[float, Field(ge=0.0, le=1.0)] = 0.08
    """Standard deviation of the per-pixel Gaussian noise (images in [0, 1])."""


class DataParams(Section):
    """`download`: where the images come from; writes data/dataset/{train,test}.parquet."""

    source: Literal["synthetic", "imagefolder", "cifar100"] = "synthetic"
    """`synthetic` (offline default), `imagefolder` (a SPLIT/CLASS/*.png tree at `path`) or
    `cifar100` (torchvision's download, checksum-verified, cached under `path`)."""
    path: Path | None = None
    """`imagefolder`: the root holding `train/` and `test/`. `cifar100`: the download cache
    directory (default `data/raw`)."""
    class_names: Path | None = None
    """`imagefolder` with class folders named by an ID (e.g. WordNet IDs): a file of
    `ID<TAB>name` lines giving the names reports and plots show (ImageNet's words.txt works: the
    first comma-separated synonym is used). Null keeps the folder names. Edits inside the file
    are not a DVC dependency (as for `path`): rerun `dvc repro -f download` after one."""
    max_per_class: Annotated[int, Field(ge=1)] | None = None
    """Keep at most this many images per class and split (the first ones in source order);
    null keeps all."""
    val_per_class: Annotated[int, Field(ge=0)] = 50
    """Training images per class moved into the validation split data/dataset/val.parquet
    (drawn with `seed`, the same for every class count): `steer` chooses its alphas there, so
    the test split only reports. 50 keeps CIFAR-100 at 45,000 training images; 0: no split."""
    seed: int = 0
    """Seed of the synthetic generator and of the validation draw."""
    synthetic: SyntheticParams = SyntheticParams()
    """Shape of the synthetic data set (used only when `source` is `synthetic`)."""

    @model_validator(mode="after")
    def _path_needed(self) -> DataParams:
        if self.source == "imagefolder" and self.path is None:
            raise ValueError("source 'imagefolder' needs `path` (a folder with train/ and test/)")
        if self.class_names is not None and self.source != "imagefolder":
            raise ValueError(f"`class_names` names image folders: it needs source 'imagefolder', not {self.source!r}")
        return self
