"""The training stages' DVCLive log (pipeline/report/live.py): DVC's layout, a headline that is
on disk after every epoch (what `dvc exp show` reads from a running experiment), and curves
that hold each epoch once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.model.flops import FlopModel
from pipeline.report.live import EpochLog


def _tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_every_epoch_leaves_the_headline_and_one_curve_row_per_scalar_on_disk(in_tmp: Path):
    log = EpochLog(Path("metrics/run"))
    assert not Path("metrics/run").exists()  # nothing is touched before the first epoch
    summary = Path("metrics/run/metrics.json")
    for epoch, loss in [(1, 2.5), (2, 1.25), (3, float("nan"))]:
        log.epoch(epoch, curves={"loss": loss, "acc": epoch / 10}, headline={"acc": epoch / 10},
                  tables={"usage": {"block 1": 0.5, "block 2": epoch / 4}})
        assert json.loads(summary.read_text()) == {"acc": epoch / 10, "step": epoch}  # the headline alone
    assert _tsv(Path("metrics/run/plots/metrics/loss.tsv")) == [["step", "loss"], ["1", "2.5"], ["2", "1.25"]]  # NaN: no point
    assert _tsv(Path("metrics/run/plots/metrics/acc.tsv"))[1:] == [["1", "0.1"], ["2", "0.2"], ["3", "0.3"]]
    table = json.loads(Path("metrics/run/plots/custom/usage.json").read_text())
    assert table == [{"epoch": e, "series": s, "usage": u} for e in (1, 2, 3) for s, u in (("block 1", 0.5), ("block 2", e / 4))]
    log.finish({"acc": 0.75, "loss": 0.5})
    assert json.loads(summary.read_text()) == {"acc": 0.75, "loss": 0.5, "step": 3}
    assert sorted(p.name for p in Path("metrics/run").iterdir()) == ["metrics.json", "plots"]  # no dvc.yaml, no report

    EpochLog(Path("metrics/run")).epoch(1, {"acc": 0.5}, {"acc": 0.5})  # a new run starts a fresh log
    assert _tsv(Path("metrics/run/plots/metrics/acc.tsv")) == [["step", "acc"], ["1", "0.5"]]
    assert not Path("metrics/run/plots/metrics/loss.tsv").exists() and not Path("metrics/run/plots/custom").exists()


def test_finetune_logs_usage_gflops_and_every_gated_block_after_each_epoch(in_tmp: Path):
    from pipeline.stages.finetune import epoch_logger

    flops = FlopModel(fixed=1e9, per_head=[0.0, 2e8, 4e8], num_heads=4)
    on_epoch = epoch_logger(EpochLog(Path("metrics/finetune")), flops, keep_layers=1)
    row = {"epoch": 1, "train_loss": 3.0, "train_accuracy": 0.25, "test_accuracy": 0.5, "head_usage": 0.75,
           "head_usage_per_block": [1.0, 0.5, 0.75]}
    on_epoch(row)
    gflops = (1e9 + 2e8 * 2 + 4e8 * 3) / 1e9
    assert json.loads(Path("metrics/finetune/metrics.json").read_text()) == {
        "test_accuracy": 0.5, "head_usage": 0.75, "gflops": pytest.approx(gflops), "step": 1}
    curves = Path("metrics/finetune/plots/metrics")
    assert sorted(p.stem for p in curves.iterdir()) == ["gflops", "head_usage", "test_accuracy", "train_accuracy", "train_loss"]
    blocks = json.loads(Path("metrics/finetune/plots/custom/head_usage_per_block.json").read_text())
    assert [(r["series"], r["head_usage_per_block"]) for r in blocks] == [("block 1", 0.5), ("block 2", 0.75)]  # ungated block 0 left out


def test_train_sae_publishes_the_test_fvu_while_it_trains(in_tmp: Path, tiny_params, monkeypatch):
    """What `dvc exp show` can list while a queued experiment trains: the file as it is on disk
    right after each epoch, read from inside the run."""
    from test_sae import write_embeddings

    from pipeline.stages import train_sae as stage

    rng = np.random.default_rng(0)
    write_embeddings(Path("data/embeddings/train.parquet"), rng.normal(size=(96, 8)).astype(np.float32), "train")
    write_embeddings(Path("data/embeddings/test.parquet"), rng.normal(size=(32, 8)).astype(np.float32), "test")
    seen = []
    original = EpochLog.epoch

    def epoch_then_read(self, n, curves, headline, tables=None):
        original(self, n, curves, headline, tables)
        seen.append(json.loads((self.directory / "metrics.json").read_text()))

    monkeypatch.setattr(EpochLog, "epoch", epoch_then_read)
    stage.run(tiny_params(sae={"expansion": 2, "k": 3, "epochs": 3, "batch_size": 32}).sae)
    history = json.loads(Path("metrics/details/sae.json").read_text())["history"]
    assert seen == [{"fvu": row["test_fvu"], "step": row["epoch"]} for row in history]
    final = json.loads(Path("metrics/sae/metrics.json").read_text())
    assert set(final) == {"fvu", "l0", "dead_fraction", "step"} and final["step"] == 3


def test_without_dvclive_the_log_has_the_same_bytes(in_tmp: Path, monkeypatch):
    """The GPU machine runs stages without DVC; there the log is written by hand, identically."""
    import sys

    from pipeline.report.live import SameLayout

    def tree(root: str) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}

    def write(directory: str) -> None:
        log = EpochLog(Path(directory))
        for epoch in (1, 2):
            log.epoch(epoch, {"loss": 1 / (epoch + 2), "acc": 0.5}, {"acc": 0.5 + epoch / 10}, {"usage": {"block 1": epoch / 3}})
        log.finish({"acc": 0.75, "fvu": 1e-7})

    write("with")
    monkeypatch.setitem(sys.modules, "dvclive", None)  # import dvclive -> ImportError
    write("without")
    assert isinstance(EpochLog(Path("x"))._live, SameLayout)
    assert tree("without") == tree("with") and len(tree("with")) == 4
