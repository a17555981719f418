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


class HuggingFaceParams(Section):
    """`data.source: huggingface`: a data set of the `datasets` library, from the hub or saved."""

    name: str | None = None
    """Hub name (e.g. `uoft-cs/cifar100`), loaded with `datasets.load_dataset` (needs the network
    the first time; `datasets` caches it under HF_HOME). Ignored when `data.path` names a data
    set saved with `save_to_disk`, which is read instead, offline."""
    revision: str | None = None
    """Hub revision (a commit hash pins the exact files); null: the default branch."""
    image_column: str = "image"
    """Column of images (`datasets.Image`, or PNG/JPEG bytes). CIFAR-100 on the hub: `img`."""
    label_column: str = "label"
    """Column of integer labels; a `ClassLabel` feature gives the class names. CIFAR-100 on
    the hub: `fine_label` (100 classes) or `coarse_label` (20)."""
    train_split: str = "train"
    """The split the training (and validation) images come from."""
    test_split: str = "test"
    """The split the test images come from."""


class DataParams(Section):
    """`download`: where the images come from; writes data/dataset/{train,test}.parquet."""

    source: Literal["synthetic", "imagefolder", "cifar100", "huggingface"] = "synthetic"
    """`synthetic` (offline default), `imagefolder` (a SPLIT/CLASS/*.png tree at `path`),
    `cifar100` (torchvision's download, checksum-verified, cached under `path`) or
    `huggingface` (a `datasets` data set: `huggingface.name` on the hub, or saved at `path`)."""
    path: Path | None = None
    """`imagefolder`: the root holding `train/` and `test/`. `cifar100`: the download cache
    directory (default `data/raw`). `huggingface`: a data set saved with `save_to_disk` (a
    `DatasetDict` with the two splits); null loads `huggingface.name` from the hub."""
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
    huggingface: HuggingFaceParams = HuggingFaceParams()
    """The `datasets` data set and its columns (used only when `source` is `huggingface`)."""

    @model_validator(mode="after")
    def _path_needed(self) -> DataParams:
        if self.source == "imagefolder" and self.path is None:
            raise ValueError("source 'imagefolder' needs `path` (a folder with train/ and test/)")
        if self.source == "huggingface" and self.path is None and self.huggingface.name is None:
            raise ValueError("source 'huggingface' needs `huggingface.name` (a hub data set) or `path` (one saved with save_to_disk)")
        if self.class_names is not None and self.source != "imagefolder":
            raise ValueError(f"`class_names` names image folders: it needs source 'imagefolder', not {self.source!r}")
        return self
