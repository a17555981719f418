"""`pipeline summarize`: spread and sign agreement across runs, on records built here."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.report.summary import RunRecord, render_markdown, summarize, write_summary


def run(name: str, accuracy: float, usage_drop: float, per_class_top: float, global_top: float,
        alphas: dict[str, float], changes: dict[str, float]) -> RunRecord:
    curve = lambda top: {"alpha": [-1.0, 0.0, 4.0], "head_usage": [0.6, 0.5, 0.5 + top], "accuracy": [0.3, 0.3, 0.3]}  # noqa: E731
    steer = {
        "strategies": {"per_class": curve(per_class_top), "global": curve(global_top)},
        "per_class_headline": {"alpha": alphas, "usage_change": changes},
    }
    return RunRecord(name, {"finetune.seed": int(name[-1])}, {"test_accuracy": accuracy, "usage_drop": usage_drop}, steer)


RUNS = [
    run("seed-0", 0.30, 0.05, -0.02, +0.08, {"bowl": 4.0, "plate": -1.0}, {"bowl": -0.1, "plate": -0.05}),
    run("seed-1", 0.34, 0.03, -0.01, -0.09, {"bowl": 2.0, "plate": 0.0}, {"bowl": -0.2, "plate": 0.0}),
    run("seed-2", 0.32, 0.04, +0.01, +0.07, {"bowl": -1.0, "plate": -0.5}, {"bowl": 0.05, "plate": -0.01}),
]


def test_headline_spread_is_mean_sample_sd_min_and_max():
    summary = summarize(RUNS)
    acc = summary["headline"]["test_accuracy"]
    assert acc["n"] == 3 and acc["mean"] == pytest.approx(0.32) and acc["std"] == pytest.approx(0.02)
    assert (acc["min"], acc["max"]) == (0.30, 0.34)
    assert summary["headline"]["usage_drop"]["std"] == pytest.approx(0.01)
    assert "fvu" not in summary["headline"]  # a quantity no run reports is left out


def test_sign_agreement_per_strategy_and_per_class():
    summary = summarize(RUNS)
    assert summary["strategies"]["per_class"]["lowers_usage"] == pytest.approx(2 / 3)  # -0.02, -0.01, +0.01
    assert summary["strategies"]["global"]["lowers_usage"] == pytest.approx(1 / 3)
    assert summary["strategies"]["global"]["changes"] == pytest.approx([0.08, -0.09, 0.07])
    bowl, plate = summary["classes"]["bowl"], summary["classes"]["plate"]
    assert bowl["modal_sign"] == 1 and bowl["sign_agreement"] == pytest.approx(2 / 3)
    assert bowl["fewer_heads"] == pytest.approx(2 / 3)
    assert plate["modal_sign"] == -1 and plate["sign_agreement"] == pytest.approx(2 / 3)
    assert plate["fewer_heads"] == pytest.approx(2 / 3)  # 0.0 is not fewer heads
    text = render_markdown(summary)
    assert "| per_class | +4 | 2 of 3 | -0.020, -0.010, +0.010 |" in text
    assert "| test_accuracy | 0.32 | 0.02 | 0.3 | 0.34 |" in text


def test_fewer_than_two_runs_are_refused():
    with pytest.raises(PipelineError, match="at least two finished experiments to compare, found 1"):
        summarize(RUNS[:1])


def test_the_files_are_written(tmp_path):
    summary = summarize(RUNS)
    write_summary(summary, RUNS, tmp_path)
    assert (tmp_path / "summary.md").read_text().startswith("# Across 3 runs: seed-0, seed-1, seed-2")
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert math.isclose(__import__("json").loads((tmp_path / "summary.json").read_text())["headline"]["test_accuracy"]["mean"], 0.32)


def test_the_command_exits_1_saying_why_without_experiments(in_tmp):
    import subprocess

    from conftest import dvc_env

    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["dvc", "init", "-q"], check=True, env=dvc_env())
    result = CliRunner().invoke(app, ["summarize", "--pattern", "^seed-"])
    assert result.exit_code == 1
    assert "summarize needs at least two finished experiments to compare, found 0" in result.output
