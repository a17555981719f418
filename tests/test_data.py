"""Data sources and the `download` stage: synthetic, imagefolder, cifar100 (offline)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data import dataset, sources
from pipeline.data.sources import synthetic
from pipeline.errors import PipelineError
from pipeline.stages import download
from pipeline.storage import metadata_dict

LOCAL_CIFAR = Path(os.environ.get("PIPELINE_CIFAR100", Path(__file__).resolve().parents[1] / "data" / "images" / "cifar100"))
"""A real CIFAR-100 image folder, where a machine has one: the configs' `data.path`, or $PIPELINE_CIFAR100."""


@pytest.fixture
def tiny_params(tiny_params):
    """The tiny params without a validation split: these tests read sources, whose own splits
    they check image by image (the validation tests below ask for one explicitly)."""
    from conftest import _merge

    def make(**sections):
        return tiny_params(**_merge({"data": {"val_per_class": 0}, "steer": {"select_on": "test"}}, sections))

    return make


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _rgb(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _nothing_written(root: Path) -> None:
    """No data set, no temporary or moved-aside directory, no metrics."""
    data = root / "data"
    leftovers = sorted(p.name for p in data.iterdir()) if data.exists() else []
    assert [name for name in leftovers if "dataset" in name] == []
    assert not (root / "metrics" / "dataset.json").exists()


# ---------------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_and_seeded(tmp_path, tiny_params):
    data = tiny_params().data
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out in (a, b, c):
        out.mkdir()
    sources.build_dataset(data, a)
    sources.build_dataset(data, b, workers=1)
    sources.build_dataset(data.model_copy(update={"seed": 1}), c)
    for split in dataset.SPLITS:
        assert (a / f"{split}.parquet").read_bytes() == (b / f"{split}.parquet").read_bytes()
        # another seed draws other images (not only other metadata)
        assert not torch.equal(dataset.load_images(a / f"{split}.parquet").images, dataset.load_images(c / f"{split}.parquet").images)
    # train and test are different images, not the same draws twice
    train, test = dataset.load_images(a / "train.parquet"), dataset.load_images(a / "test.parquet")
    assert not torch.equal(train.images[: len(test)], test.images)


def test_the_validation_split_is_carved_from_train_stratified_seeded_and_disjoint(tmp_path, tiny_params, monkeypatch):
    monkeypatch.setattr(dataset, "ROW_GROUP_SIZE", 5)  # several row groups, re-chunked
    data = tiny_params(data={"val_per_class": 3, "synthetic": {"num_classes": 4, "train_per_class": 10}}).data
    out, again, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (out, again, other):
        d.mkdir()
    summary = sources.build_dataset(data, out)
    train, val = dataset.load_images(out / "train.parquet"), dataset.load_images(out / "val.parquet")
    assert torch.bincount(val.labels).tolist() == [3] * 4 and torch.bincount(train.labels).tolist() == [7] * 4
    assert summary["splits"]["val"]["total"] == 12 and summary["splits"]["train"]["total"] == 28
    # disjoint, and together exactly the source's training split (by source index and pixels)
    assert not set(train.index.tolist()) & set(val.index.tolist())
    everything = tmp_path / "all"
    everything.mkdir()
    sources.build_dataset(data.model_copy(update={"val_per_class": 0}), everything)
    full = dataset.load_images(everything / "train.parquet")
    assert not (everything / "val.parquet").exists()
    for part in (train, val):
        for row, index in enumerate(part.index.tolist()):
            assert torch.equal(part.images[row], full.images[full.index.tolist().index(index)])
    assert sorted(train.index.tolist() + val.index.tolist()) == sorted(full.index.tolist())
    assert train.index.tolist() == sorted(train.index.tolist())  # source order kept
    assert metadata_dict(pq.ParquetFile(out / "val.parquet").schema_arrow)["split"] == "val"
    assert [pq.ParquetFile(out / "train.parquet").metadata.row_group(i).num_rows for i in range(6)] == [5, 5, 5, 5, 5, 3]
    # seeded: the same bytes again, another draw with another seed
    sources.build_dataset(data, again)
    assert (again / "val.parquet").read_bytes() == (out / "val.parquet").read_bytes()
    sources.build_dataset(data.model_copy(update={"seed": 5}), other)
    assert dataset.load_images(other / "val.parquet").index.tolist() != val.index.tolist()


def test_a_validation_split_that_would_empty_a_class_is_refused(tmp_path, tiny_params):
    from pipeline.errors import ParamsError

    data = tiny_params(data={"val_per_class": 5, "synthetic": {"train_per_class": 5}}).data
    with pytest.raises(ParamsError, match="data.val_per_class = 5: class 0 has only 5 training images"):
        sources.build_dataset(data, tmp_path)


def test_selecting_on_validation_needs_a_validation_split(tiny_params):
    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError, match="steer.select_on 'val' needs a validation split"):
        tiny_params(data={"val_per_class": 0}, steer={"select_on": "val"})
    assert tiny_params(data={"val_per_class": 0}, steer={"select_on": "test"}).steer.select_on == "test"


def test_synthetic_layout_and_metadata(tmp_path, tiny_params):
    data = tiny_params(data={"synthetic": {"num_classes": 3, "train_per_class": 5, "test_per_class": 2}}).data
    summary = sources.build_dataset(data, tmp_path)
    pf = pq.ParquetFile(tmp_path / "train.parquet")
    assert pf.schema_arrow.names == ["image", "label", "index"]
    meta = metadata_dict(pf.schema_arrow)
    assert meta["class_names"] == ["red_circle_solid", "red_ring_solid", "blue_circle_stripes"]
    assert meta["split"] == "train" and meta["image_size"] == [16, 16]
    assert meta["source"]["kind"] == "synthetic" and meta["source"]["seed"] == 0
    assert meta["source"]["num_classes"] == 3 and meta["source"]["noise"] == 0.05
    images = dataset.load_images(tmp_path / "train.parquet")
    assert images.images.shape == (15, 3, 16, 16) and images.images.dtype == torch.uint8
    assert images.labels.tolist() == [0, 1, 2] * 5  # classes interleaved
    assert images.index.tolist() == list(range(15))
    assert summary["splits"]["test"]["per_class"] == {n: 2 for n in meta["class_names"]}
    assert summary["splits"]["train"]["total"] == 15 and summary["image_size"] == [16, 16]


def test_synthetic_row_groups_are_fixed(tmp_path, tiny_params, monkeypatch):
    monkeypatch.setattr(dataset, "ROW_GROUP_SIZE", 8)
    sources.build_dataset(tiny_params().data, tmp_path)  # 4 classes x 16 = 64 train rows
    pf = pq.ParquetFile(tmp_path / "train.parquet")
    assert [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)] == [8] * 8


def test_synthetic_classes_share_attributes():
    combos = synthetic.synthetic_classes(48)
    assert len(set(combos)) == 48
    names = synthetic.synthetic_class_names(10)
    colours = [n.split("_")[0] for n in names]
    shapes = [n.split("_")[1] for n in names]
    textures = [n.split("_")[2] for n in names]
    for values, vocabulary in ((colours, synthetic.COLOURS), (shapes, synthetic.SHAPES), (textures, synthetic.TEXTURES)):
        assert set(values) == set(vocabulary)
        assert min(values.count(v) for v in vocabulary) >= 2, "every attribute value shared by 2+ classes"
    # the first two classes ("plate" and "bowl") differ only in shape
    assert names[:2] == ["red_circle_solid", "red_ring_solid"]
    with pytest.raises(PipelineError, match="at most 48"):
        synthetic.synthetic_classes(49)


def test_render_draws_the_shape_it_names():
    classes = [("red", "circle", "solid"), ("red", "ring", "solid"), ("blue", "square", "stripes")]
    size = 32
    params = np.full((3, synthetic._N_PARAMS), 0.5)
    params[:, synthetic._P_RADIUS] = 1.0  # radius 0.4 * size, centred (cx = cy = 0.5)
    params[:, synthetic._P_BG] = 0.0  # dark grey background (0.1)
    images = synthetic.render_synthetic(classes, np.arange(3), params, np.zeros((3, size, size, 3)), size) / 255.0
    red = np.array(synthetic.COLOURS["red"])
    centre, corner = (size // 2, size // 2), (0, 0)
    np.testing.assert_allclose(images[0][centre], red, atol=0.01)  # disc: colour at the centre
    np.testing.assert_allclose(images[1][centre], [0.1] * 3, atol=0.01)  # ring: hole at the centre
    for image in images:
        np.testing.assert_allclose(image[corner], [0.1] * 3, atol=0.01)
    disc_fraction = (np.abs(images[0] - red).max(-1) < 0.05).mean()
    assert disc_fraction == pytest.approx(np.pi * 0.4**2, abs=0.03)
    # stripes: the blue square alternates full and dark blue along some direction
    blue = images[2][np.abs(images[2] - [0.1] * 3).max(-1) > 0.05]
    assert blue[:, 2].max() > 0.85 and blue[:, 2].min() < 0.4


def test_synthetic_not_separable_by_mean_colour_but_learnable(tmp_path, tiny_params):
    data = tiny_params(
        data={
            "synthetic": {"num_classes": 10, "train_per_class": 60, "test_per_class": 30, "image_size": 32, "noise": 0.08}
        }
    ).data  # the demo's classes, size and noise; fewer images
    sources.build_dataset(data, tmp_path)
    train, test = dataset.load_images(tmp_path / "train.parquet"), dataset.load_images(tmp_path / "test.parquet")

    def knn_accuracy(features, k: int = 5) -> float:
        """k-nearest-neighbour vote on standardised per-image features."""
        a, b = features(train), features(test)
        mu, sd = a.mean(0), a.std(0) + 1e-6
        neighbours = torch.cdist((b - mu) / sd, (a - mu) / sd).topk(k, largest=False).indices
        return float((torch.mode(train.labels[neighbours], 1).values == test.labels).float().mean())

    def lda_accuracy(features) -> float:
        """Linear discriminant analysis: the best linear classifier for Gaussian classes."""
        a, b = features(train).double(), features(test).double()
        means = torch.stack([a[train.labels == c].mean(0) for c in range(10)])
        centred = a - means[train.labels]
        precision = torch.linalg.inv(centred.T @ centred / len(a) + 1e-6 * torch.eye(a.shape[1], dtype=a.dtype))
        scores = b @ precision @ means.T - 0.5 * ((means @ precision) * means).sum(1)
        return float((scores.argmax(1) == test.labels).float().mean())

    def mean_rgb(s):
        return s.images.float().mean((2, 3)) / 255

    def colour_and_texture(s):  # adds contrast and edge density: texture and size information
        x = s.images.float() / 255
        gx = (x[..., 1:] - x[..., :-1]).abs().mean((2, 3))
        gy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((2, 3))
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), gx, gy], 1)

    # chance is 0.1; measured (seeds 0-3): mean colour 0.35-0.43 (kNN), 0.44-0.49 (LDA);
    # colour and texture statistics 0.87-0.90 (kNN)
    assert 0.15 < knn_accuracy(mean_rgb) < 0.6
    assert lda_accuracy(mean_rgb) < 0.6
    assert knn_accuracy(colour_and_texture) > 0.75


def test_max_per_class_keeps_the_first_images(tmp_path, tiny_params):
    full, small = tmp_path / "full", tmp_path / "small"
    full.mkdir(), small.mkdir()
    sources.build_dataset(tiny_params().data, full)
    summary = sources.build_dataset(tiny_params(data={"max_per_class": 3}).data, small)
    assert summary["splits"]["train"]["total"] == 12 and summary["splits"]["test"]["total"] == 12
    a, b = pq.read_table(full / "train.parquet"), pq.read_table(small / "train.parquet")
    assert b.column("index").to_pylist() == list(range(12))
    assert b.column("image").to_pylist() == a.column("image").to_pylist()[:12]
    assert metadata_dict(pq.ParquetFile(small / "train.parquet").schema_arrow)["max_per_class"] == 3


def test_first_per_class():
    assert dataset.first_per_class([0, 0, 1, 0, 1, 2, 1], 2) == [0, 1, 2, 4, 5]
    assert dataset.first_per_class([3, 3, 3], None) == [0, 1, 2]


def test_download_stage_writes_dataset_and_metrics(in_tmp, tiny_params):
    download.run(tiny_params().data)
    assert sorted(p.name for p in (in_tmp / "data" / "dataset").iterdir()) == ["test.parquet", "train.parquet"]
    assert sorted(p.name for p in (in_tmp / "data").iterdir()) == ["dataset"]  # no temporaries left
    metrics = json.loads((in_tmp / "metrics" / "dataset.json").read_text())
    assert metrics["num_classes"] == 4 and metrics["source"] == "synthetic"
    assert metrics["splits"]["train"]["total"] == 64 and metrics["splits"]["test"]["total"] == 32
    assert set(metrics["splits"]["train"]["per_class"].values()) == {16}


def test_reading_rows_and_groups_of_rows_gives_the_stored_images(in_tmp, tiny_params):
    """The galleries' reads: chosen rows decode to the split's own images, in the order asked."""
    download.run(tiny_params().data)
    path = in_tmp / "data" / "dataset" / "train.parquet"
    whole = dataset.load_images(path)
    rows = [5, 0, 63, 5]
    images, labels, n_rows = dataset.read_images_at(path, rows)
    assert n_rows == 64 and images.shape == (4, 16, 16, 3)
    assert np.array_equal(images, whole.images[rows].permute(0, 2, 3, 1).numpy())
    assert np.array_equal(labels, whole.labels[rows].numpy())
    groups, group_labels, _ = dataset.read_image_groups(path, [[5, 0], [], [63, 5]])
    assert [len(g) for g in groups] == [2, 0, 2]
    assert np.array_equal(np.concatenate(groups), images) and np.array_equal(np.concatenate(group_labels), labels)


# -------------------------------------------------------------------------------- imagefolder
def _make_tree(root: Path) -> dict[str, np.ndarray]:
    """train/{cat,dog} and test/{cat,dog}: RGB PNGs, a JPEG, a greyscale PNG and a stray file."""
    pixels = {}

    def put(rel: str, array: np.ndarray, **save) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, **save)
        pixels[rel] = np.array(Image.open(path).convert("RGB"))

    # compress_level 1: different bytes from the PNGs the pipeline itself would encode
    put("train/dog/b.png", _rgb(1), compress_level=1)
    put("train/dog/a.png", _rgb(2), compress_level=1)
    put("train/cat/z.jpg", _rgb(3), quality=95)
    put("train/cat/c.png", _rgb(4), compress_level=1)
    put("train/cat/d.png", _rgb(5)[..., 0])  # greyscale
    put("test/cat/x.png", _rgb(6))
    put("test/dog/y.PNG", _rgb(7))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return pixels


def test_imagefolder_reads_a_tree(tmp_path, tiny_params):
    pixels = _make_tree(tmp_path / "tree")
    out = tmp_path / "out"
    out.mkdir()
    data = tiny_params(data={"source": "imagefolder", "path": str(tmp_path / "tree")}).data
    summary = sources.build_dataset(data, out)
    train = dataset.load_images(out / "train.parquet")
    assert train.class_names == ["cat", "dog"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1]
    assert train.index.tolist() == [0, 1, 2, 3, 4]
    order = ["train/cat/c.png", "train/cat/d.png", "train/cat/z.jpg", "train/dog/a.png", "train/dog/b.png"]
    for row, rel in enumerate(order):
        assert torch.equal(train.images[row], torch.from_numpy(pixels[rel]).permute(2, 0, 1)), rel
    blobs = pq.read_table(out / "train.parquet").column("image").to_pylist()
    assert blobs[0] == (tmp_path / "tree" / order[0]).read_bytes()  # RGB PNG stored as-is
    assert all(b.startswith(b"\x89PNG") for b in blobs)  # JPEG and greyscale re-encoded to PNG
    assert summary["splits"]["train"]["per_class"] == {"cat": 3, "dog": 2}
    meta = train.meta
    assert meta["source"] == {"kind": "imagefolder", "path": str(tmp_path / "tree")}
    assert meta["image_size"] == [8, 8]
    # threads change nothing
    again = tmp_path / "again"
    again.mkdir()
    sources.build_dataset(data, again, workers=1)
    assert (again / "train.parquet").read_bytes() == (out / "train.parquet").read_bytes()


def test_imagefolder_reads_lossless_webp_as_the_same_pixels(tmp_path, tiny_params):
    # a lossless WebP copy of a PNG folder (about 20% smaller: how CIFAR-100 travelled to the GPU
    # machine for the cifar100-gpu run) gives the same pixels, re-encoded as PNG
    for split, seed in (("train", 1), ("test", 2)):
        for name, offset in (("cat", 0), ("dog", 10)):
            folder = tmp_path / "tree" / split / name
            folder.mkdir(parents=True)
            Image.fromarray(_rgb(seed + offset)).save(folder / "a.webp", lossless=True, quality=100)
    data = tiny_params(data={"source": "imagefolder", "path": str(tmp_path / "tree")}).data
    sources.build_dataset(data, tmp_path)
    train = dataset.load_images(tmp_path / "train.parquet")
    assert train.labels.tolist() == [0, 1]
    assert torch.equal(train.images[1], torch.from_numpy(_rgb(11)).permute(2, 0, 1))
    assert pq.read_table(tmp_path / "train.parquet").column("image").to_pylist()[0].startswith(b"\x89PNG")


def test_imagefolder_max_per_class_keeps_source_index(tmp_path, tiny_params):
    _make_tree(tmp_path / "tree")
    data = tiny_params(data={"source": "imagefolder", "path": str(tmp_path / "tree"), "max_per_class": 1}).data
    sources.build_dataset(data, tmp_path)
    train = dataset.load_images(tmp_path / "train.parquet")
    assert train.labels.tolist() == [0, 1] and train.index.tolist() == [0, 3]


def _break_missing_root(root: Path) -> None:
    import shutil

    shutil.rmtree(root)


def _break_missing_split(root: Path) -> None:
    import shutil

    shutil.rmtree(root / "test")


def _break_empty_class(root: Path) -> None:
    for f in (root / "test" / "dog").iterdir():
        f.unlink()


def _break_no_classes(root: Path) -> None:
    import shutil

    for d in (root / "test").iterdir():
        shutil.rmtree(d)


def _break_class_sets(root: Path) -> None:
    (root / "test" / "dog").rename(root / "test" / "wolf")


def _break_truncated(root: Path) -> None:
    path = root / "train" / "dog" / "b.png"
    path.write_bytes(path.read_bytes()[:60])


def _break_garbage(root: Path) -> None:
    (root / "test" / "cat" / "x.png").write_bytes(b"definitely not a png")


def _break_size(root: Path) -> None:
    Image.fromarray(_rgb(9, size=9)).save(root / "test" / "dog" / "big.png")


def _break_split_sizes(root: Path) -> None:
    for path in (root / "test").rglob("*.*"):
        Image.fromarray(_rgb(9, size=9)).save(path, format="PNG")


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_break_missing_root, "is not a directory"),
        (_break_missing_split, r"test missing"),
        (_break_empty_class, r"dog holds no images"),
        (_break_no_classes, "holds no class folders"),
        (_break_class_sets, r"different class folders.*only in train: \['dog'\].*only in test: \['wolf'\]"),
        (_break_truncated, r"b\.png cannot be read as an image"),
        (_break_garbage, r"x\.png cannot be read as an image"),
        (_break_size, r"big\.png is 9x9 .* earlier images are 8x8"),
        (_break_split_sizes, r"train images are \[8, 8\] \(HxW\) but test images are \[9, 9\]"),
    ],
)
def test_imagefolder_errors_leave_nothing(in_tmp, tiny_params, breaker, message):
    tree = in_tmp / "tree"
    _make_tree(tree)
    breaker(tree)
    with pytest.raises(PipelineError, match=message):
        download.run(tiny_params(data={"source": "imagefolder", "path": str(tree)}).data)
    _nothing_written(in_tmp)


def test_failed_run_keeps_previous_dataset(in_tmp, tiny_params):
    download.run(tiny_params().data)
    before = {p.name: p.read_bytes() for p in (in_tmp / "data" / "dataset").iterdir()}
    tree = in_tmp / "tree"
    _make_tree(tree)
    _break_truncated(tree)
    with pytest.raises(PipelineError):
        download.run(tiny_params(data={"source": "imagefolder", "path": str(tree)}).data)
    after = {p.name: p.read_bytes() for p in (in_tmp / "data" / "dataset").iterdir()}
    assert after == before
    assert sorted(p.name for p in (in_tmp / "data").iterdir()) == ["dataset"]


def _make_id_tree(root: Path) -> None:
    """Class folders named by WordNet-style IDs, in the order n1 < n2 < n3."""
    for split in ("train", "test"):
        for seed, folder in enumerate(("n01", "n02", "n03")):
            (root / split / folder).mkdir(parents=True)
            Image.fromarray(_rgb(seed)).save(root / split / folder / "a.png")


def test_a_class_names_file_turns_folder_ids_into_words(tmp_path, tiny_params):
    _make_id_tree(tmp_path / "tree")
    words = tmp_path / "words.txt"  # ImageNet's words.txt style: synonyms after a tab, commas between
    words.write_text("# id\tname\nn03\tcrane, derrick\nn01\ttench, Tinca tinca\n\nn02\tcrane\nn99\tunused\n")
    data = tiny_params(data={"source": "imagefolder", "path": str(tmp_path / "tree"), "class_names": str(words)}).data
    out = tmp_path / "out"
    out.mkdir()
    summary = sources.build_dataset(data, out)
    train = dataset.load_images(out / "train.parquet")
    # folder order (the labels) is kept; two folders called "crane" are told apart by their ID
    assert train.class_names == ["tench", "crane (n02)", "crane (n03)"]
    assert summary["class_names"] == train.class_names and train.labels.tolist() == [0, 1, 2]
    assert train.meta["source"]["class_names_file"] == str(words)


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot be read"),
    ("n01 tench\n", "line 1 is not `ID<TAB>name`"),
    ("n01\ttench\nn01\ttinca\n", "'n01' appears twice"),
    ("n01\ttench\nn02\tgoldfish\n", "no name for the class folders ['n03']"),
])
def test_a_bad_class_names_file_exits_2_naming_the_key_and_writes_nothing(in_tmp, tiny_params_dict, content, message):
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    _make_id_tree(in_tmp / "tree")
    if content is not None:
        (in_tmp / "words.txt").write_text(content)
    params = tiny_params_dict(data={"source": "imagefolder", "path": "tree", "class_names": "words.txt"})
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["download"])
    assert result.exit_code == 2, result.output
    assert "data.class_names" in result.output and message in result.output and "Traceback" not in result.output
    _nothing_written(in_tmp)


def test_class_names_need_an_image_folder(tiny_params):
    from pipeline.errors import ParamsError

    with pytest.raises(ParamsError, match="`class_names` names image folders: it needs source 'imagefolder'"):
        tiny_params(data={"class_names": "words.txt"})


def test_cli_reports_a_bad_folder(in_tmp, tiny_params_dict):
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    params = tiny_params_dict(data={"source": "imagefolder", "path": "nope"})
    (in_tmp / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["download"])
    assert result.exit_code == 1
    assert "imagefolder: data.path nope is not a directory" in result.output
    assert "Traceback" not in result.output
    _nothing_written(in_tmp)


@pytest.mark.skipif(not LOCAL_CIFAR.is_dir(), reason="no local CIFAR-100 image folder (data/images/cifar100 or $PIPELINE_CIFAR100)")
def test_imagefolder_real_cifar100(tmp_path, tiny_params):
    data = tiny_params(data={"source": "imagefolder", "path": str(LOCAL_CIFAR), "max_per_class": 2}).data
    summary = sources.build_dataset(data, tmp_path)
    assert summary["num_classes"] == 100 and summary["image_size"] == [32, 32]
    assert summary["class_names"][:3] == ["apple", "aquarium_fish", "baby"]
    assert summary["splits"]["train"]["total"] == 200 and summary["splits"]["test"]["total"] == 200
    train = dataset.load_images(tmp_path / "train.parquet", num_workers=2)
    assert train.index[:4].tolist() == [0, 1, 500, 501]  # 500 training images per class
    assert 90 < train.images.float().mean() < 150  # real photographs, not blank


# ----------------------------------------------------------------------------------- cifar100
FAKE_CLASSES = ["apple", "bowl", "plate"]


def _fake_cifar_archive(directory: Path) -> tuple[Path, dict[str, str], dict[str, np.ndarray]]:
    """A tiny cifar-100-python.tar.gz in CIFAR's python format; (archive, md5s, arrays)."""
    rng = np.random.default_rng(0)
    arrays, md5s, members = {}, {}, {}
    for name, n in (("train", 7), ("test", 4)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, len(FAKE_CLASSES), n)]
        arrays[name], arrays[f"{name}_labels"] = images.transpose(0, 2, 3, 1), np.array(labels)
        batch = {"data": images.reshape(n, -1), "fine_labels": labels, "coarse_labels": [0] * n}
        members[name] = pickle.dumps(batch)
    members["meta"] = pickle.dumps({"fine_label_names": FAKE_CLASSES, "coarse_label_names": ["food"]})
    archive = directory / "fake-cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        md5s = {name: hashlib.md5(blob).hexdigest() for name, blob in members.items()}
    md5s["archive"] = hashlib.md5(archive.read_bytes()).hexdigest()
    return archive, md5s, arrays


class _FakeResponse(io.BytesIO):
    def __init__(self, url: str, payload: bytes) -> None:
        super().__init__(payload)
        self.url = url
        self.length = len(payload)


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """CIFAR100 pointed at a local fake archive; urlopen serves file:// URLs, nothing else."""
    from torchvision.datasets import CIFAR100

    archive, md5s, arrays = _fake_cifar_archive(tmp_path)
    monkeypatch.setattr(CIFAR100, "url", archive.as_uri())
    monkeypatch.setattr(CIFAR100, "tgz_md5", md5s["archive"])
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5s["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5s["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": md5s["meta"]})
    calls = []

    def urlopen(request, *args, **kwargs):
        url = request.full_url if isinstance(request, urllib.request.Request) else request
        calls.append(url)
        if not url.startswith("file://"):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return _FakeResponse(url, Path(urllib.request.url2pathname(url[len("file://") :])).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return {"archive": archive, "arrays": arrays, "calls": calls, "md5s": md5s}


def test_cifar100_downloads_and_converts(in_tmp, tiny_params, fake_cifar):
    download.run(tiny_params(data={"source": "cifar100"}).data)
    assert fake_cifar["calls"], "torchvision fetched the archive through urlopen"
    assert (in_tmp / "data" / "raw" / "cifar-100-python.tar.gz").exists()  # default cache
    arrays = fake_cifar["arrays"]
    for split in dataset.SPLITS:
        images = dataset.load_images(in_tmp / "data" / "dataset" / f"{split}.parquet")
        assert images.class_names == FAKE_CLASSES
        assert images.labels.tolist() == arrays[f"{split}_labels"].tolist()
        assert torch.equal(images.images, torch.from_numpy(arrays[split]).permute(0, 3, 1, 2))
        assert images.index.tolist() == list(range(len(images)))
        assert images.meta["source"]["kind"] == "cifar100" and images.meta["source"]["cache"] == "data/raw"
    metrics = json.loads((in_tmp / "metrics" / "dataset.json").read_text())
    assert metrics["splits"]["train"]["total"] == 7 and metrics["image_size"] == [32, 32]


def test_cifar100_max_per_class(in_tmp, tiny_params, fake_cifar):
    download.run(tiny_params(data={"source": "cifar100", "path": "cache", "max_per_class": 1}).data)
    labels = fake_cifar["arrays"]["train_labels"].tolist()
    train = dataset.load_images(in_tmp / "data" / "dataset" / "train.parquet")
    expected = [labels.index(c) for c in sorted(set(labels), key=labels.index)]
    assert train.index.tolist() == expected
    assert (in_tmp / "cache" / "cifar-100-python.tar.gz").exists()


def test_cifar100_checksum_mismatch(in_tmp, tiny_params, fake_cifar, monkeypatch):
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "tgz_md5", "0" * 32)
    with pytest.raises(PipelineError, match="checksum mismatch.*expected archive md5 0000"):
        download.run(tiny_params(data={"source": "cifar100"}).data)
    _nothing_written(in_tmp)


def test_cifar100_offline_says_how_to_use_a_local_copy(in_tmp, tiny_params, fake_cifar, monkeypatch):
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "url", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")
    with pytest.raises(PipelineError) as excinfo:
        download.run(tiny_params(data={"source": "cifar100"}).data)
    message = str(excinfo.value)
    assert "downloading https://www.cs.toronto.edu" in message and "name resolution" in message
    assert "cifar-100-python.tar.gz" in message and "data/raw" in message
    assert "data.source: imagefolder" in message
    _nothing_written(in_tmp)
    # following the advice works without any network
    (in_tmp / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (in_tmp / "data" / "raw" / "cifar-100-python.tar.gz").write_bytes(fake_cifar["archive"].read_bytes())
    fake_cifar["calls"].clear()
    download.run(tiny_params(data={"source": "cifar100"}).data)
    assert fake_cifar["calls"] == []
    assert (in_tmp / "data" / "dataset" / "train.parquet").exists()


# ------------------------------------------------------------------------------------ reading
def test_load_images_errors(tmp_path, tiny_params):
    with pytest.raises(PipelineError, match="missing"):
        dataset.load_images(tmp_path / "nothing.parquet")
    sources.build_dataset(tiny_params().data, tmp_path)
    good = tmp_path / "train.parquet"
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(PipelineError, match="truncated.parquet"):
        dataset.load_images(truncated)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"image": pa.array([b"x"], pa.binary()), "label": pa.array([0], pa.int32())}), wrong)
    with pytest.raises(PipelineError, match="column 'index' missing"):
        dataset.load_images(wrong)
    table = pq.read_table(good)
    blobs = table.column("image").to_pylist()
    blobs[5] = blobs[5][:40]
    corrupt = tmp_path / "corrupt.parquet"
    pq.write_table(table.set_column(0, "image", pa.array(blobs, pa.binary())), corrupt)
    with pytest.raises(PipelineError, match="row 5 cannot be decoded"):
        dataset.load_images(corrupt, num_workers=2)
