"""`extract` under torchrun: two CPU processes (gloo) write files byte-identical to one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.params.file import parse_params
from pipeline.stages import download, finetune
from pipeline.stages.extract import shard_rows

from conftest import TINY_PARAMS, _merge

OUTPUTS = ["data/embeddings/train.parquet", "data/embeddings/val.parquet", "data/embeddings/test.parquet", "metrics/details/extract.json"]


@pytest.mark.parametrize("n, batch_size, world", [(64, 24, 2), (32, 24, 2), (10, 3, 3), (5, 8, 2), (0, 4, 2)])
def test_shards_partition_the_rows_into_whole_global_batches(n, batch_size, world):
    shards = [shard_rows(n, batch_size, rank, world) for rank in range(world)]
    assert torch.equal(torch.sort(torch.cat(shards)).values, torch.arange(n))
    global_batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    for rank, rows in enumerate(shards):
        # the shard, cut into batches of the same size, is exactly this rank's global batches
        own = [rows[s : s + batch_size].tolist() for s in range(0, len(rows), batch_size)]
        assert own == global_batches[rank::world]


def _run(args: list[str], threads: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PIPELINE_LOG": "INFO"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_process_torchrun_extract_is_byte_identical_to_one_process(in_tmp):
    # 48 train rows in batches of 20: three batches, the last one partial, ranks owning 2 and 1;
    # the 16 validation rows are one batch, so rank 1's shard is empty; extra layer 0 exercises
    # the optional columns too.
    raw = _merge(TINY_PARAMS, {"extract": {"batch_size": 20, "layers": [0], "nproc": 2}})
    params = parse_params(raw)
    download.run(params.data)
    finetune.run(params.model, params.finetune)
    Path("params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))

    # CPU kernels reduce in an order that depends on the thread count, so both runs use one
    # thread per process (what torchrun sets for nproc > 1); the shards must change nothing else.
    bin_dir = Path(sys.executable).parent
    _run([sys.executable, "-m", "pipeline", "extract"], threads="1")
    single = {name: Path(name).read_bytes() for name in OUTPUTS}

    result = _run([str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "pipeline", "extract"], threads="1")
    assert "rank 1/2 extracted 20 of 48 train rows" in result.stderr
    assert "rank 1/2 extracted 0 of 16 val rows" in result.stderr
    assert "merged 2 shards per split" in result.stderr
    for name in OUTPUTS:
        assert Path(name).read_bytes() == single[name], f"{name} differs between 1 and 2 processes"
    leftovers = [p.name for p in Path("data").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # shards and temporaries are gone
