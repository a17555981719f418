"""`finetune` under torchrun: two CPU processes (gloo) train one model with DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.gated_vit import load_gated_vit
from pipeline.params import parse_params
from pipeline.stages import download

from conftest import TINY_PARAMS, _merge


@pytest.mark.slow
def test_two_process_torchrun_finetune_writes_the_same_kind_of_outputs(in_tmp):
    raw = _merge(TINY_PARAMS, {"finetune": {"nproc": 2, "batch_size": 16, "epochs": 2}})
    params = parse_params(raw)
    download.run(params)
    Path("params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_LOG": "INFO"}
    result = subprocess.run(
        [str(torchrun), "--standalone", f"--nproc_per_node={params.finetune.nproc}", "-m", "pipeline", "finetune"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr
    metrics = json.loads(Path("metrics/finetune.json").read_text())
    assert {"test_accuracy", "head_usage", "head_usage_per_block"} <= set(metrics)
    assert len(metrics["head_usage_per_block"]) == 2
    assert len(Path("metrics/finetune/plots/metrics/train_loss.tsv").read_text().splitlines()) == 3  # header + 2 epochs
    model, config = load_gated_vit("models/vit")
    # the weights moved away from the seeded initialisation (both ranks trained one model)
    torch.manual_seed(params.finetune.seed)
    from pipeline.gated_vit import build_gated_vit

    init = build_gated_vit(params.model, num_classes=4)
    moved = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), init.state_dict().values())]
    assert sum(moved) > len(moved) // 2
    assert not any(p.name.startswith(".") for p in Path("models").iterdir())  # no temporaries left


def test_a_batch_that_the_whole_run_cannot_share_evenly_is_refused(tiny_params):
    """params only see one node's nproc; train() sees the whole world and refuses a remainder
    (3 processes, e.g. 3 nodes x 1, cannot share a batch of 16 without dropping samples)."""
    from pipeline.gated_vit import build_gated_vit
    from pipeline.io import PipelineError
    from pipeline.training import DistInfo, train

    params = tiny_params(finetune={"batch_size": 16})
    model = build_gated_vit(params.model, num_classes=4)
    images = torch.zeros(32, 3, 16, 16, dtype=torch.uint8)
    labels = torch.zeros(32, dtype=torch.long)
    config = {"shape": {"img_size": 16}, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(PipelineError, match="batch_size 16 is not divisible by the 3 processes"):
        train(model, images, labels, images, labels, config, params.finetune, torch.device("cpu"), DistInfo(0, 3, 0))
