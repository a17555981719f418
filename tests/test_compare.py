"""`pipeline compare`: one row per experiment from its own files, shares of its own ceiling."""

from __future__ import annotations

import pytest

from pipeline.errors import PipelineError
from pipeline.report import compare as cmp
from pipeline.report.summary import RunRecord

FILES = {
    "a": {"metrics/details/sae.json": {"test": {"fvu": 0.02, "l0": 16.0, "dead_fraction": 0.5}},
          "metrics/details/interpret.json": {"purity": {"random": {"mean": 0.88}, "pca": {"mean": 0.54}}},
          "metrics/details/ceiling.json": {"summary": {"mean_usage_change": -0.4}},
          "metrics/details/report.json": {"shift_vs_keep": {"per_class": {"sign_agreement": 0.82}}}},
    "b": {"metrics/details/ceiling.json": {"summary": {"mean_usage_change": -0.2}}},
}


def run(name: str, architecture: str, usage: float, class_direction: float) -> RunRecord:
    steer = {"per_class_headline": {"mean_usage_change": usage, "mean_usage_change_ci": [usage - 0.01, usage + 0.01],
                                    "mean_accuracy_change": -0.001},
             "controls": {"class_direction": {"mean_usage_change": class_direction}}}
    return RunRecord(name, {"sae.architecture": architecture, "sae.k": 16, "data.path": f"/{name}"}, {"purity": 0.9}, steer, rev=name)


def test_compare_reads_each_run_and_shares_its_own_ceiling(monkeypatch):
    monkeypatch.setattr(cmp, "git_json", lambda rev, path, repo: FILES[rev].get(path, {}))
    rows = cmp.compare([run("a", "topk", -0.1, -0.2), run("b", "jumprelu", -0.05, -0.3)])
    assert [r.settings for r in rows] == [{"sae.architecture": "topk"}, {"sae.architecture": "jumprelu"}]  # k and the path drop out
    assert rows[0].share_of_ceiling == pytest.approx(0.25) and rows[1].share_of_ceiling == pytest.approx(0.25)
    assert rows[1].class_direction_share == pytest.approx(1.5)
    assert rows[1].fvu is None and rows[0].sign_agreement == 0.82
    text = cmp.render_markdown(rows)
    assert "| a | topk | 0.0200 | 16.0 | 0.50 | 0.900 (0.880 / 0.540) | -0.100 [-0.110, -0.090] | -0.1 | 25% | 50% | 82% |" in text
    assert "| b | jumprelu | - | - | - | 0.900 (- / -) | -0.050 [-0.060, -0.040] | -0.1 | 25% | 150% | - |" in text


def test_compare_without_runs_is_an_error():
    with pytest.raises(PipelineError, match="no finished experiment"):
        cmp.compare([])
