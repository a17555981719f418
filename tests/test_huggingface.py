"""`data.source: huggingface`: a data set of the `datasets` library, saved with `save_to_disk`
by the test itself (offline), read through the real loading code; the hub path is exercised
with a local fake of `datasets.load_dataset`, never the network."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

datasets = pytest.importorskip("datasets")

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from pipeline.cli import app  # noqa: E402
from pipeline.data import dataset, sources  # noqa: E402
from pipeline.errors import ParamsError, PipelineError  # noqa: E402

from conftest import TINY_PARAMS, _merge  # noqa: E402
from dvc_project import new_project, sh  # noqa: E402

CLASSES = ["apple", "bowl", "plate", "pine_tree"]


def _images(count: int, seed: int, size: int = 16) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]


def save_dataset(root: Path, per_class: tuple[int, int] = (12, 6), image_column: str = "img",
                 label_column: str = "fine_label") -> dict[str, tuple[list[np.ndarray], list[int]]]:
    """A DatasetDict with `train` and `test` in CIFAR-100's hub layout (an Image column and a
    ClassLabel column), saved at `root`; returns each split's arrays and labels."""
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=CLASSES)})
    splits, content = {}, {}
    for seed, (split, n) in enumerate(zip(("train", "test"), per_class)):
        labels = [i % len(CLASSES) for i in range(n * len(CLASSES))]  # interleaved, as on the hub
        arrays = _images(len(labels), seed)
        # one image as JPEG bytes and one greyscale: the source must make RGB PNGs of both
        cells: list = [Image.fromarray(a) for a in arrays]
        cells[1] = Image.fromarray(arrays[1][:, :, 0], "L")
        arrays[1] = np.repeat(arrays[1][:, :, :1], 3, axis=2)
        splits[split] = datasets.Dataset.from_dict({image_column: cells, label_column: labels}, features=features)
        content[split] = (arrays, labels)
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return content


def hf_params(tiny_params, path: Path | None, **huggingface):
    return tiny_params(data={"source": "huggingface", "path": str(path) if path else None, "val_per_class": 2,
                             "huggingface": {"image_column": "img", "label_column": "fine_label", **huggingface}}).data


def test_a_saved_datasets_data_set_becomes_the_pipelines_splits(tmp_path, tiny_params):
    content = save_dataset(tmp_path / "hf")
    data = hf_params(tiny_params, tmp_path / "hf")
    (tmp_path / "out").mkdir()
    summary = sources.build_dataset(data, tmp_path / "out", workers=2)
    assert summary["source"] == "huggingface" and summary["class_names"] == CLASSES
    assert summary["num_classes"] == 4 and summary["image_size"] == [16, 16]
    assert {s: summary["splits"][s]["total"] for s in ("train", "val", "test")} == {"train": 40, "val": 8, "test": 24}
    test = dataset.load_images(tmp_path / "out" / "test.parquet")
    arrays, labels = content["test"]
    assert test.class_names == CLASSES and test.labels.tolist() == labels
    for row, array in enumerate(arrays):  # lossless; the greyscale image made RGB
        assert torch.equal(test.images[row], torch.from_numpy(array).permute(2, 0, 1)), row
    for png in pq.read_table(tmp_path / "out" / "test.parquet").column("image").to_pylist():
        with Image.open(io.BytesIO(png)) as img:
            assert img.format == "PNG" and img.mode == "RGB"
    assert test.meta["source"]["kind"] == "huggingface" and test.meta["source"]["path"] == str(tmp_path / "hf")
    assert test.meta["source"]["split"] == "test"
    again = tmp_path / "again"  # threads change nothing
    again.mkdir()
    sources.build_dataset(data, again, workers=1)
    assert (again / "test.parquet").read_bytes() == (tmp_path / "out" / "test.parquet").read_bytes()


def test_max_per_class_keeps_the_first_rows_of_each_class(tmp_path, tiny_params):
    save_dataset(tmp_path / "hf")
    data = hf_params(tiny_params, tmp_path / "hf").model_copy(update={"max_per_class": 3, "val_per_class": 0})
    (tmp_path / "out").mkdir()
    summary = sources.build_dataset(data, tmp_path / "out", workers=1)
    assert summary["splits"]["train"]["total"] == 12 and summary["splits"]["test"]["total"] == 12


@pytest.mark.parametrize(("override", "needle"), [
    ({"image_column": "image"}, "data.huggingface.image_column = 'image'"),
    ({"label_column": "label"}, "data.huggingface.label_column = 'label'"),
    ({"test_split": "validation"}, "data.huggingface.test_split = 'validation'"),
])
def test_bad_column_and_split_names_exit_2_naming_the_key(tmp_path, tiny_params_dict, monkeypatch, override, needle):
    save_dataset(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    raw = tiny_params_dict(data={"source": "huggingface", "path": str(tmp_path / "hf"),
                                 "huggingface": {"image_column": "img", "label_column": "fine_label", **override}})
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    result = CliRunner().invoke(app, ["download"])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not Path("data/dataset").exists() and not Path("metrics/dataset.json").exists()


def test_a_label_column_without_class_names_is_refused(tmp_path, tiny_params):
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.Value("int64")})
    cells = [Image.fromarray(a) for a in _images(4, 0)]
    split = datasets.Dataset.from_dict({"img": cells, "fine_label": [0, 1, 0, 1]}, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ParamsError, match="not a ClassLabel"):
        sources.open_source(hf_params(tiny_params, tmp_path / "hf"), "train", 1)


def test_the_hub_path_calls_load_dataset_with_name_split_and_revision(tmp_path, tiny_params, monkeypatch):
    save_dataset(tmp_path / "hf")
    saved = datasets.load_from_disk(str(tmp_path / "hf"))
    calls = []

    def fake_load_dataset(name, split=None, revision=None):
        calls.append((name, split, revision))
        return saved[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = hf_params(tiny_params, None, name="uoft-cs/cifar100", revision="abc123")
    source = sources.open_source(data, "train", 1)
    assert source.class_names == CLASSES and source.count == 48
    assert calls == [("uoft-cs/cifar100", "train", "abc123")]
    assert source.description["name"] == "uoft-cs/cifar100" and source.description["revision"] == "abc123"

    def offline(name, split=None, revision=None):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar100' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PipelineError, match="save_to_disk"):
        sources.open_source(data, "test", 1)


def test_the_source_needs_a_name_or_a_path(tiny_params):
    with pytest.raises(ParamsError, match="huggingface.name"):
        tiny_params(data={"source": "huggingface"})


def test_a_tiny_dvc_pipeline_runs_from_a_saved_datasets_data_set(tmp_path):
    save_dataset(tmp_path / "hf", per_class=(12, 6))
    raw = _merge(TINY_PARAMS, {"data": {"source": "huggingface", "path": str(tmp_path / "hf"), "val_per_class": 2,
                                        "huggingface": {"image_column": "img", "label_column": "fine_label"}}})
    repo = new_project(tmp_path, raw)
    sh(repo, "dvc", "repro")
    summary = json.loads((repo / "metrics/dataset.json").read_text())
    assert summary["source"] == "huggingface" and summary["num_classes"] == 4
    report = (repo / "metrics/report.md").read_text()
    assert "pine_tree" in report  # the class names came from the ClassLabel feature
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "repro")
