"""The real `dvc repro` in a temporary git repository, one property per test on one finished
run: all eight stages run and write the report; the explore and export commands read the run;
a second repro reruns nothing; each kind of change reruns only the stages it touches."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.steering.strategies import STRATEGIES

from conftest import TINY_PARAMS, dvc_env
from dvc_project import new_project, ran_stages, sh


def cli(repo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=repo, env=dvc_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny project after its first `dvc repro`, and what that printed. Tests only read it
    (one that changes things works on a copy)."""
    repo = new_project(tmp_path_factory.mktemp("pipeline-dvc"), TINY_PARAMS)
    return repo, sh(repo, "dvc", "repro")


@pytest.mark.slow
def test_the_first_repro_runs_every_stage_and_writes_the_report(finished):
    repo, first = finished
    assert ran_stages(first) == {"download", "finetune", "extract", "train_sae", "latent_stats", "interpret", "steer", "ceiling", "latency",
                                 "report", "explorer"}
    report = (repo / "metrics/report.md").read_text()
    assert "## Per-class steering (headline)" in report and "| class |" in report
    assert "## What the latents mean" in report and "### Class cards" in report
    assert "## Why steering moves the heads it moves" in report
    assert (repo / "metrics/explorer/index.html").is_file() and any((repo / "metrics/explorer/img").glob("latent_*.webp"))
    steer = json.loads((repo / "metrics/details/steer.json").read_text())
    assert set(steer["strategies"]) == set(STRATEGIES)
    assert set(steer["controls"]) == {name for name, s in STRATEGIES.items() if s.is_control}
    assert len(steer["controls"]["random_direction"]["draws"]["usage_change"]) == TINY_PARAMS["steer"]["null_draws"]
    assert "| control: the class's mean embedding direction (no SAE) |" in report
    assert steer["settings"]["select_on"] == "val" and steer["settings"]["images"] == {"val": 16, "test": 32}
    assert steer["settings"]["model_sha256"] == hashlib.sha256((repo / "models/vit/model.safetensors").read_bytes()).hexdigest()
    assert (repo / "data/dataset/val.parquet").exists() and (repo / "data/embeddings/val.parquet").exists()
    headline = pq.read_table(repo / "data/steer/headline.parquet").to_pydict()
    assert headline["alpha"] == [steer["per_class_headline"]["alpha"][c] for c in headline["class"]]


@pytest.mark.slow
def test_the_class_directions_come_from_the_training_split_alone(finished):
    import torch

    from pipeline.data.embeddings import read_embeddings
    from pipeline.steering.controls import class_mean_directions, read_directions

    repo, _ = finished
    stored = read_directions(repo / "data/steer/directions.safetensors")
    n_classes = stored.class_mean.shape[0]
    per_split = {split: read_embeddings(repo / f"data/embeddings/{split}.parquet") for split in ("train", "val", "test")}
    directions = {split: class_mean_directions(t.x, t.labels, n_classes) for split, t in per_split.items()}
    assert torch.allclose(stored.class_mean, directions["train"], atol=1e-6)
    assert not torch.allclose(stored.class_mean, directions["test"], atol=1e-3)
    assert not torch.allclose(stored.class_mean, directions["val"], atol=1e-3)
    all_images = torch.cat([t.x for t in per_split.values()]), torch.cat([t.labels for t in per_split.values()])
    assert not torch.allclose(stored.class_mean, class_mean_directions(*all_images, n_classes), atol=1e-3)


@pytest.mark.slow
def test_latent_and_class_describe_a_finished_run(finished):
    repo, _ = finished
    latents = pq.read_table(repo / "data/interpret/latents.parquet").to_pydict()
    alive = [j for j, rate in zip(latents["latent"], latents["firing_rate"]) if rate > 0]
    shown = cli(repo, "latent", str(alive[0]))
    assert shown.returncode == 0, shown.stderr
    assert f"latent {alive[0]}: '{latents['label'][alive[0]]}'" in shown.stdout and "gate-logit change per unit activation" in shown.stdout
    assert (repo / f"explore/latent_{alive[0]}.png").stat().st_size > 1000
    first_class = json.loads((repo / "data/stats/top_sets.json").read_text())["class_names"][0]
    card = cli(repo, "class", first_class)
    assert card.returncode == 0, card.stderr
    assert card.stdout.startswith(f"class {first_class}: top latents") and "steering (headline" in card.stdout
    assert cli(repo, "latent", "100000").returncode == 1
    unknown = cli(repo, "class", "no-such-class")
    assert unknown.returncode == 1 and "no class 'no-such-class'" in unknown.stderr


@pytest.mark.slow
def test_export_pruned_keeps_the_majority_heads_or_the_headline_heads(finished):
    repo, _ = finished
    pair = json.loads((repo / "data/stats/top_sets.json").read_text())["class_names"][:2]
    exported = cli(repo, "export-pruned", "--classes", ",".join(pair))
    assert exported.returncode == 0, exported.stderr
    result = json.loads((repo / f"explore/pruned-{pair[0]}-{pair[1]}/export.json").read_text())
    assert result["classes"] == pair and result["gflops"]["compact"] <= result["gflops"]["dense"]
    assert "| compact |" in exported.stdout and "| gated, head-skipping path |" in exported.stdout
    assert set(result["latency_ms"]["batch1"]) == {"gated", "gated_skipping", "compact"}
    assert result["accuracy"]["gated_skipping"] == result["accuracy"]["gated"]  # the paths agree on every prediction
    steered = cli(repo, "export-pruned", "--classes", ",".join(pair), "--heads", "headline")
    assert steered.returncode == 0, steered.stderr
    with_headline = json.loads((repo / f"explore/pruned-{pair[0]}-{pair[1]}-headline/export.json").read_text())
    blocks = list(result["kept_heads"])
    assert [with_headline["kept_heads"][b] for b in blocks[:-1]] == [result["kept_heads"][b] for b in blocks[:-1]]
    rates = with_headline["steering_headline"]["keep_rates_on_selection_split"][blocks[-1]]
    assert with_headline["kept_heads"][blocks[-1]] == [h for h, rate in enumerate(rates) if rate > 0.5]
    assert "steered at those alphas" in steered.stdout
    assert cli(repo, "export-pruned", "--classes", "no-such-class").returncode == 1
    assert cli(repo, "export-pruned", "--classes", pair[0], "--heads", "loudest").returncode == 1


@pytest.mark.slow
def test_a_second_repro_reruns_nothing(finished):
    repo, _ = finished
    second = sh(repo, "dvc", "repro")
    assert ran_stages(second) == set() and "up to date" in second
    assert "changed" not in sh(repo, "dvc", "status")


@pytest.mark.slow
def test_each_params_change_reruns_only_the_stages_that_read_it(finished, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(finished[0], repo, symlinks=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())

    def change(section: str, key: str, value) -> set[str]:
        params[section][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return ran_stages(sh(repo, "dvc", "repro"))

    # steering, interpretation and the ceiling are independent; the report and the explorer read all
    # three, `latency` the headline's alphas and the ceiling's patterns
    assert change("steer", "alphas", [-1.0, 0.0, 2.0]) == {"steer", "latency", "report", "explorer"}
    assert change("steer", "accuracy_tolerance", 0.01) == {"steer", "ceiling", "latency", "report", "explorer"}  # the rule both use
    assert change("ceiling", "search", "greedy") == {"ceiling", "latency", "report", "explorer"}
    assert change("latency", "images", 8) == {"latency", "report"}
    assert change("interpret", "top_n", 5) == {"interpret", "report", "explorer"}
    assert change("interpret", "grid_images", 2) == {"interpret", "report", "explorer"}  # thumbnails per latent
    # a `data` change reruns download; its output changes, so everything downstream follows
    ran = change("data", "seed", 1)
    assert {"download", "steer", "report"} <= ran
    # A `data` change that keeps every image (max_per_class above the class size) changes only
    # the data set's provenance metadata: finetune reruns and, being deterministic, writes the
    # same weights, so DVC's content hashes stop the rerun before train_sae and latent_stats.
    assert change("data", "max_per_class", 1000) == {"download", "finetune", "extract", "interpret", "steer", "ceiling", "latency",
                                                      "report", "explorer"}


def test_the_explore_commands_name_the_stage_to_run_when_its_outputs_are_missing(tmp_path):
    repo = new_project(tmp_path, TINY_PARAMS)
    for args in (("latent", "0"), ("class", "red_circle_solid")):
        result = cli(repo, *args)
        assert result.returncode == 1 and "dvc repro interpret" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_every_sae_architecture_runs_every_stage_after_it(finished, tmp_path, monkeypatch):
    """train_sae, latent_stats, interpret, steer and report (in-process, on a copy of the finished
    run) with each architecture: everything after the SAE works unchanged with any of them."""
    from pipeline.cli import call_stage
    from pipeline.params.file import parse_params

    repo = tmp_path / "repo"
    shutil.copytree(finished[0], repo, symlinks=True)
    monkeypatch.chdir(repo)
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    for architecture in ("batchtopk", "jumprelu", "matryoshka", "frozen_random"):
        params = parse_params({**raw, "sae": {**raw["sae"], "architecture": architecture}}, "params")
        for stage in ("train_sae", "latent_stats", "interpret", "steer", "report"):
            call_stage(stage, params)
        config = json.loads((repo / "models/sae/config.json").read_text())
        assert config["format"] == f"{architecture}_sae"
        assert json.loads((repo / "metrics/details/sae.json").read_text())["architecture"] == architecture
        steer = json.loads((repo / "metrics/details/steer.json").read_text())
        assert "per_class_headline" in steer and set(steer["controls"]) == {"random_direction", "class_direction", "gate_direction"}
        assert "## How much control" in (repo / "metrics/report.md").read_text()
