"""The real `dvc repro` in a temporary git repository: all six stages, then nothing reruns,
then a `data` change reruns `download` (and, content changing, everything after it)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import TINY_PARAMS
from dvc_project import new_project, ran_stages, sh


@pytest.mark.slow
def test_dvc_repro_runs_all_stages_then_nothing_then_only_what_changed(tmp_path):
    repo = new_project(tmp_path, TINY_PARAMS)

    first = sh(repo, "dvc", "repro")
    assert ran_stages(first) == {"download", "finetune", "extract", "train_sae", "latent_stats", "steer"}
    report = (repo / "metrics/report.md").read_text()
    assert "## Per-class steering (headline)" in report and "| class |" in report
    steer = json.loads((repo / "metrics/details/steer.json").read_text())
    assert set(steer["strategies"]) == {"per_class", "per_class_predicted", "global", "random", "random_per_class"}
    assert steer["settings"]["select_on"] == "val" and steer["settings"]["images"] == {"val": 16, "test": 32}
    assert (repo / "data/dataset/val.parquet").exists() and (repo / "data/embeddings/val.parquet").exists()

    second = sh(repo, "dvc", "repro")
    assert ran_stages(second) == set() and "up to date" in second
    assert "changed" not in sh(repo, "dvc", "status")

    # A `data` change reruns download; its output changes, so everything downstream follows.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "download" in sh(repo, "dvc", "status")
    third = sh(repo, "dvc", "repro")
    assert "download" in ran_stages(third) and "steer" in ran_stages(third)

    # A `data` change that keeps every image (max_per_class above the class size) changes only
    # the data set's provenance metadata: finetune reruns and, being deterministic, writes the
    # same weights, so DVC's content hashes stop the rerun before train_sae and latent_stats.
    params["data"]["max_per_class"] = 1000
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = sh(repo, "dvc", "repro")
    assert ran_stages(fourth) == {"download", "finetune", "extract", "steer"}
