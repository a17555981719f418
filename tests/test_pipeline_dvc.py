"""The real `dvc repro` in a temporary git repository: all seven stages, then nothing reruns,
then a `steer` change reruns `steer` alone, an `interpret` change `interpret` and `steer`, and a
`data` change `download` (and, content changing, everything after it)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import TINY_PARAMS, dvc_env
from dvc_project import new_project, ran_stages, sh


def cli(repo, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=repo, env=dvc_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dvc_repro_runs_all_stages_then_nothing_then_only_what_changed(tmp_path):
    repo = new_project(tmp_path, TINY_PARAMS)

    first = sh(repo, "dvc", "repro")
    assert ran_stages(first) == {"download", "finetune", "extract", "train_sae", "latent_stats", "interpret", "steer"}
    report = (repo / "metrics/report.md").read_text()
    assert "## Per-class steering (headline)" in report and "| class |" in report
    assert "## What the latents mean" in report and "### Class cards" in report
    assert "## Why steering moves the heads it moves" in report
    steer = json.loads((repo / "metrics/details/steer.json").read_text())
    assert set(steer["strategies"]) == {"per_class", "per_class_predicted", "global", "random", "random_per_class"}
    assert steer["settings"]["select_on"] == "val" and steer["settings"]["images"] == {"val": 16, "test": 32}
    assert steer["settings"]["model_sha256"] == hashlib.sha256((repo / "models/vit/model.safetensors").read_bytes()).hexdigest()
    assert (repo / "data/dataset/val.parquet").exists() and (repo / "data/embeddings/val.parquet").exists()

    # A person exploring the run: one latent, one class (read from the stages' outputs).
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
    rates = with_headline["steering_headline"]["keep_rates_on_selection_split"]
    assert with_headline["kept_heads"][blocks[-1]] == [h for h, rate in enumerate(rates) if rate > 0.5]
    assert "steered at those alphas" in steered.stdout
    assert cli(repo, "export-pruned", "--classes", "no-such-class").returncode == 1
    assert cli(repo, "export-pruned", "--classes", pair[0], "--heads", "loudest").returncode == 1
    assert cli(repo, "latent", "100000").returncode == 1
    unknown = cli(repo, "class", "no-such-class")
    assert unknown.returncode == 1 and "no class 'no-such-class'" in unknown.stderr

    second = sh(repo, "dvc", "repro")
    assert ran_stages(second) == set() and "up to date" in second
    assert "changed" not in sh(repo, "dvc", "status")

    # A steering change does not touch interpret; an interpret change reruns steer's report too.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["steer"]["alphas"] = [-1.0, 0.0, 2.0]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(sh(repo, "dvc", "repro")) == {"steer"}
    params["interpret"]["top_n"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran_stages(sh(repo, "dvc", "repro")) == {"interpret", "steer"}

    # A `data` change reruns download; its output changes, so everything downstream follows.
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
    assert ran_stages(fourth) == {"download", "finetune", "extract", "interpret", "steer"}


def test_the_explore_commands_name_the_stage_to_run_when_its_outputs_are_missing(tmp_path):
    repo = new_project(tmp_path, TINY_PARAMS)
    for args in (("latent", "0"), ("class", "red_circle_solid")):
        result = cli(repo, *args)
        assert result.returncode == 1 and "dvc repro interpret" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
