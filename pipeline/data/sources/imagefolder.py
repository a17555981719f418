"""`data.source: imagefolder`: a `ROOT/{train,test}/CLASS/*.png|jpg|jpeg|webp` tree at `data.path`,
with class names from the folder names or, for folders named by an ID (WordNet IDs such as
`n02132136`), from the file `data.class_names`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.dataset import SPLITS, Record, SplitSource, first_per_class, map_ordered
from pipeline.data.sources import IMAGE_ERRORS, rgb_png
from pipeline.errors import ParamsError, PipelineError
from pipeline.params.data import DataParams

NAME = "imagefolder"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

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
            raise PipelineError(f"imagefolder: {folder} holds no images (*.png, *.jpg, *.jpeg, *.webp)")
        files += [(p, label) for p in images]
    return files


def _load_image_file(path: Path) -> tuple[bytes, tuple[int, int]]:
    """Read and fully decode one image file; PNG bytes (as-is when already an RGB PNG)."""
    try:
        return rgb_png(path.read_bytes())
    except IMAGE_ERRORS as exc:
        raise PipelineError(f"imagefolder: {path} cannot be read as an image ({exc})") from None


def open_split(data: DataParams, split: str, workers: int) -> SplitSource:
    """One split of the `data.path/{train,test}/CLASS/*` tree, files decoded on `workers` threads."""
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
    shown = class_names
    if data.class_names is not None:
        shown = readable_names(class_names, read_class_names(data.class_names))
        description["class_names_file"] = str(data.class_names)
    return SplitSource(shown, description, map_ordered(load, keep, workers), len(keep))


def read_class_names(path: Path) -> dict[str, str]:
    """`data.class_names`: `ID<TAB>name` lines (blank lines and `#` comments skipped). With
    several comma-separated synonyms, as in ImageNet's words.txt, the first is the name."""
    where = f"data.class_names = '{path}'"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{where}: cannot be read ({exc})") from None
    names: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("\t")
        name = value.split(",")[0].strip()
        if not sep or not key.strip() or not name:
            raise ParamsError(f"{where}: line {number} is not `ID<TAB>name` ({line[:60]!r})")
        if key.strip() in names:
            raise ParamsError(f"{where}: ID {key.strip()!r} appears twice (line {number})")
        names[key.strip()] = name
    return names


def readable_names(folders: Sequence[str], names: dict[str, str]) -> list[str]:
    """Each class folder's name from the file; a name that two folders share (ImageNet has two
    "crane"s) is told apart by its folder, as in `crane (n02012849)`."""
    missing = [folder for folder in folders if folder not in names]
    if missing:
        raise ParamsError(f"data.class_names: no name for the class folders {missing[:5]} ({len(missing)} of {len(folders)})")
    shown = [names[folder] for folder in folders]
    counts = Counter(shown)
    return [f"{name} ({folder})" if counts[name] > 1 else name for name, folder in zip(shown, folders)]
