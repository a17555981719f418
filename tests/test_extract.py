"""The `extract` stage: stored rows agree with the model, files are deterministic and checked."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.dataset import load_images
from pipeline.data.embeddings import read_embeddings
from pipeline.errors import PipelineError
from pipeline.model.gated_vit import load_gated_vit
from pipeline.params.file import parse_params
from pipeline.stages import download, extract, finetune

from conftest import TINY_PARAMS, _merge


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny project run up to `extract` (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("extract")
    params = parse_params(_merge(TINY_PARAMS, {"extract": {"layers": [0], "batch_size": 20}}))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        download.run(params.data)
        finetune.run(params.model, params.finetune)
        extract.run(params.extract)
    finally:
        os.chdir(cwd)
    return root


def test_stored_logits_recompute_from_stored_x(workdir):
    model, config = load_gated_vit(workdir / "models/vit")
    for split in ("train", "test"):
        table = read_embeddings(workdir / f"data/embeddings/{split}.parquet")
        with torch.no_grad():
            logits = model.final_gate_logits(table.x)
        assert torch.allclose(logits, table.gate_logits, atol=1e-5)
        assert torch.equal(table.gates, table.gate_logits > 0)
        dataset = load_images(workdir / f"data/dataset/{split}.parquet")
        assert torch.equal(table.labels, dataset.labels) and torch.equal(table.index, dataset.index)


def test_recomputed_accuracy_and_usage_match_finetune(workdir):
    finetune_metrics = json.loads((workdir / "metrics/details/finetune.json").read_text())
    extract_metrics = json.loads((workdir / "metrics/details/extract.json").read_text())
    table = read_embeddings(workdir / "data/embeddings/test.parquet")
    assert table.accuracy == pytest.approx(finetune_metrics["test_accuracy"], abs=1e-12)
    assert table.head_usage == pytest.approx(finetune_metrics["head_usage"], abs=1e-12)
    assert extract_metrics["consistent_with_finetune"] is True
    assert extract_metrics["rows"] == {"train": 48, "val": 16, "test": 32} and extract_metrics["dim"] == 24


def test_schema_and_metadata(workdir):
    pf = pq.ParquetFile(workdir / "data/embeddings/train.parquet")
    schema = pf.schema_arrow
    assert schema.field("x").type == pa.list_(pa.float32(), 24)
    assert schema.field("x_block0").type == pa.list_(pa.float32(), 24)
    assert schema.field("gates").type == pa.list_(pa.bool_(), 3)
    meta = {k.decode(): json.loads(v) for k, v in schema.metadata.items() if not k.startswith(b"ARROW")}
    assert meta["dim"] == 24 and meta["layer"] == 1 and meta["num_heads"] == 3 and meta["extra_layers"] == [0]
    assert len(meta["class_names"]) == 4 and len(meta["model_hash"]) == 16
    assert pf.metadata.num_row_groups == 3  # 48 rows in batches of 20
    assert pf.metadata.row_group(0).column(6).compression == "ZSTD"


def test_both_head_paths_store_the_same_rows_and_say_which_ran(workdir, tmp_path, tiny_params, monkeypatch):
    """extract.heads: `auto` is `skipping` on the CPU; `masked` stores the same rows up to
    float rounding (gates, predictions and per-block head counts exactly)."""
    assert read_embeddings(workdir / "data/embeddings/test.parquet").meta["head_path"] == "skipping"
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    monkeypatch.chdir(run)
    tables = {}
    for path in ("masked", "skipping"):
        extract.run(tiny_params(extract={"layers": [0], "batch_size": 20, "heads": path}).extract)
        assert json.loads(Path("metrics/details/extract.json").read_text())["head_path"] == path
        tables[path] = {split: read_embeddings(Path(f"data/embeddings/{split}.parquet")) for split in ("train", "val", "test")}
    for split, masked in tables["masked"].items():
        skipping = tables["skipping"][split]
        assert masked.meta["head_path"] == "masked" and skipping.meta["head_path"] == "skipping"
        assert torch.allclose(masked.x, skipping.x, atol=1e-5)
        assert torch.allclose(masked.gate_logits, skipping.gate_logits, atol=1e-5)
        assert torch.equal(masked.gates, skipping.gates) and torch.equal(masked.predictions, skipping.predictions)
        assert torch.equal(masked.kept_per_block, skipping.kept_per_block)


def test_extract_is_byte_identical_on_rerun(workdir, tiny_params, monkeypatch):
    before = {p.name: p.read_bytes() for p in (workdir / "data/embeddings").iterdir()}
    monkeypatch.chdir(workdir)
    extract.run(tiny_params(extract={"layers": [0], "batch_size": 20}).extract)
    after = {p.name: p.read_bytes() for p in (workdir / "data/embeddings").iterdir()}
    assert before == after


def test_truncated_and_mismatched_files_give_clear_errors(workdir, tmp_path):
    good = workdir / "data/embeddings/test.parquet"
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(PipelineError, match="truncated.parquet"):
        read_embeddings(truncated)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0], "label": [0, 1]}), other)
    with pytest.raises(PipelineError, match="column 'index' missing"):
        read_embeddings(other)
    with pytest.raises(PipelineError, match="missing"):
        read_embeddings(tmp_path / "absent.parquet")


def test_layer_beyond_the_model_is_a_parameter_error(workdir, tmp_path, tiny_params, monkeypatch):
    from pipeline.errors import ParamsError

    shutil.copytree(workdir, tmp_path / "w", dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path / "w")
    with pytest.raises(ParamsError, match="extract.layers"):
        extract.run(tiny_params(extract={"layers": [7]}).extract)


def test_gflops_per_image_follow_every_blocks_kept_heads_and_finetunes_usage(workdir):
    """extract's GFLOPs come from each image's kept heads in every block; their test mean equals
    what finetune computes from its per-block usage (same FLOP model, same gates)."""
    model, _ = load_gated_vit(workdir / "models/vit")
    test = read_embeddings(workdir / "data/embeddings/test.parquet")
    assert test.kept_per_block.shape == (32, model.depth - model.keep_layers)
    assert torch.equal(test.kept_per_block[:, -1].long(), test.gates.sum(1))  # final block: its stored gates
    gflops = json.loads((workdir / "metrics/details/extract.json").read_text())["gflops"]
    finetune_metrics = json.loads((workdir / "metrics/details/finetune.json").read_text())
    assert gflops["test"] == pytest.approx(finetune_metrics["gflops"], rel=1e-9)
    assert gflops["dense"] == pytest.approx(finetune_metrics["gflops_dense"], rel=1e-12)
    per_class = [v for v in gflops["per_class_test"].values() if v is not None]
    counts = torch.bincount(test.labels, minlength=len(gflops["per_class_test"]))
    weighted = sum(v * int(n) for v, n in zip(gflops["per_class_test"].values(), counts) if v is not None) / int(counts.sum())
    assert len(per_class) == 4 and weighted == pytest.approx(gflops["test"], rel=1e-9)
