"""`extract`: the final block's CLS input and gate decisions of every image, into Parquet.

Runs as one process or under torchrun (`extract.nproc` processes per node, any number of
nodes). With several processes every rank extracts the batches `rank, rank + world, ...` of
each split into a shard file; after a barrier rank 0 copies the shards' row groups back into
global batch order. A batch is computed from exactly the same images as in a single-process
run and becomes exactly the same row group, so the merged files are byte-identical to a
one-process run (and DVC's hash does not depend on the process count; on the CPU given the
same threads per process, since kernels reduce in a thread-count dependent order, and torchrun
sets OMP_NUM_THREADS=1 when it starts several processes). Shards go through a
shared directory next to the output: multi-node runs need the repository on a shared file
system, which they need anyway to read data/dataset and models/vit.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from pipeline.checks import same_classes
from pipeline.data.dataset import ImageSet, available_splits, load_images
from pipeline.data.embeddings import embedding_schema, read_embeddings
from pipeline.errors import ParamsError
from pipeline.layout import download, finetune
from pipeline.layout import extract as files
from pipeline.model.config import ModelConfig
from pipeline.model.extraction import extract_split
from pipeline.model.flops import FlopModel, flop_model
from pipeline.model.gated_vit import GatedViT, load_gated_vit, resolve_head_path
from pipeline.model.record import read_record
from pipeline.params.extract import ExtractParams
from pipeline.runtime import DistInfo, device_and_distributed, finish_distributed
from pipeline.storage import atomic_path, clean_outputs, parquet_writer, weights_sha256, write_json

log = logging.getLogger(__name__)

SHARD_DIR = files.EMBEDDINGS.with_name(f".{files.EMBEDDINGS.name}.shards")


def shard_rows(n: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """Row indices of the batches `rank, rank + world, ...`, in order. Every batch but the last
    is full, so the shard's own batching (same `batch_size`) reproduces the global batches."""
    starts = range(rank * batch_size, n, world * batch_size)
    if not starts:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(start, min(start + batch_size, n)) for start in starts])


def merge_shards(shards: list[Path], out_path: Path, schema: pa.Schema, n: int, batch_size: int) -> None:
    """Write the shards' row groups in global batch order (batch b is row group b // world of
    shard b % world): the same row groups a single process writes, one in memory at a time."""
    shard_files = [pq.ParquetFile(str(path)) for path in shards]
    world = len(shard_files)
    with parquet_writer(out_path, schema) as writer:
        for batch in range(-(-n // batch_size)):
            table = shard_files[batch % world].read_row_group(batch // world)
            writer.write_table(table, row_group_size=batch_size)


def load_split(split: str, config: ModelConfig) -> ImageSet:
    """One split of the data set, checked against the class names the model was trained on."""
    path = download.dataset_split(split)
    images = load_images(path)
    same_classes(images.class_names, path, config.class_names, finetune.MODEL_CONFIG, rerun="finetune")
    return images


def run(ep: ExtractParams) -> None:
    device, dist_info = device_and_distributed(ep.device)
    if dist_info.is_main:
        clean_outputs(*files.WRITES)
    model, config = load_gated_vit(finetune.MODEL)
    model.head_path = resolve_head_path(ep.heads, device)
    log.info("gated blocks run on the %s head path (extract.heads=%s, %s)", model.head_path, ep.heads, device.type)
    bad = [i for i in ep.layers if i >= model.depth]
    if bad:
        raise ParamsError(f"extract.layers = {ep.layers}: blocks {bad} do not exist (the model has {model.depth})")
    extra = tuple(sorted(set(ep.layers) - {model.depth - 1}))
    model_hash = weights_sha256(finetune.MODEL)[:16]  # short: names the model in the embeddings' metadata
    # train, val when the data set has one, test (a missing train or test file is named when read)
    splits = ("train", *(("val",) if "val" in available_splits(download.DATASET) else ()), "test")
    metas = {
        split: {
            "model_hash": model_hash,
            "layer": model.depth - 1,
            "dim": model.vit.embed_dim,
            "num_heads": model.num_heads,
            "class_names": config.class_names,
            "split": split,
            "extra_layers": list(extra),
            "head_path": model.head_path,
        }
        for split in splits
    }

    if dist_info.world == 1:
        with atomic_path(files.EMBEDDINGS, directory=True) as tmp:
            for split in splits:
                images = load_split(split, config)
                extract_split(model, images.images, images.labels, images.index, config, tmp / f"{split}.parquet", metas[split], ep.batch_size, device, extra)
                log.info("extracted %d %s rows", len(images.labels), split)
    else:
        extract_sharded(model, config, metas, ep.batch_size, device, extra, dist_info)

    if dist_info.is_main:
        write_metrics(model_hash, splits, flop_model(model), model.keep_layers, model.head_path)
    finish_distributed(dist_info)


def extract_sharded(model: GatedViT, config: ModelConfig, metas: dict, batch_size: int, device: torch.device, extra: tuple[int, ...], dist_info: DistInfo) -> None:
    """Each rank writes its batches of every split to SHARD_DIR; rank 0 then merges them into
    data/embeddings (atomically) and removes the shards."""
    if dist_info.is_main:
        shutil.rmtree(SHARD_DIR, ignore_errors=True)  # leftovers of a killed run
        SHARD_DIR.mkdir(parents=True)
    dist.barrier()
    sizes = {}
    for split in metas:
        images = load_split(split, config)
        sizes[split] = len(images.labels)
        rows = shard_rows(sizes[split], batch_size, dist_info.rank, dist_info.world)
        with atomic_path(SHARD_DIR / f"{split}.rank{dist_info.rank}.parquet") as out:
            extract_split(model, images.images[rows], images.labels[rows], images.index[rows], config, out, metas[split], batch_size, device, extra)
        log.info("rank %d/%d extracted %d of %d %s rows", dist_info.rank, dist_info.world, len(rows), sizes[split], split)
    dist.barrier()  # every shard is complete
    if not dist_info.is_main:
        return
    with atomic_path(files.EMBEDDINGS, directory=True) as tmp:
        for split in metas:
            schema = embedding_schema(model.vit.embed_dim, model.num_heads, list(extra), metas[split],
                                      gated_blocks=model.depth - model.keep_layers)
            shards = [SHARD_DIR / f"{split}.rank{r}.parquet" for r in range(dist_info.world)]
            merge_shards(shards, tmp / f"{split}.parquet", schema, sizes[split], batch_size)
    shutil.rmtree(SHARD_DIR, ignore_errors=True)
    log.info("merged %d shards per split into %s", dist_info.world, files.EMBEDDINGS)


def write_metrics(model_hash: str, splits: tuple[str, ...], flops: FlopModel, keep_layers: int, head_path: str) -> None:
    """Recompute the headline numbers from the stored rows: they must agree with finetune's."""
    tables = {split: read_embeddings(files.embeddings_split(split)) for split in splits}
    test = tables["test"]
    record = read_record(finetune.DETAILS)  # unrounded
    consistent = abs(test.accuracy - record.test_accuracy) < 1e-9 and abs(test.head_usage - record.head_usage) < 1e-9
    if not consistent:
        log.warning(
            "stored rows give accuracy %.6f / usage %.6f, finetune reported %.6f / %.6f",
            test.accuracy, test.head_usage, record.test_accuracy, record.head_usage,
        )
    write_json(
        files.DETAILS,
        {
            "rows": {split: int(t.x.shape[0]) for split, t in tables.items()},
            "dim": test.dim,
            "num_heads": int(test.gates.shape[1]),
            "layer": test.meta["layer"],
            "model_hash": model_hash,
            "test_accuracy": test.accuracy,
            "head_usage": test.head_usage,
            "train_accuracy": tables["train"].accuracy,
            "consistent_with_finetune": consistent,
            "head_path": head_path,
            "gflops": gflops_per_image(tables, flops, keep_layers),
        },
    )


def gflops_per_image(tables: dict, flops: FlopModel, keep_layers: int) -> dict:
    """Mean matmul GFLOPs per image from every block's kept heads (pipeline.model.flops), per split
    and per test class: what a head-skipping path spends, beside the dense model."""
    def per_image(table) -> torch.Tensor:
        kept = table.kept_per_block.double()
        ungated = torch.full((len(kept), keep_layers), float(flops.num_heads), dtype=torch.float64)
        return (flops.fixed + torch.cat([ungated, kept], 1) @ torch.tensor(flops.per_head, dtype=torch.float64)) / 1e9

    out = {"dense": flops.dense / 1e9, **{split: float(per_image(t).mean()) for split, t in tables.items()}}
    test = tables["test"]
    cost = per_image(test)
    out["per_class_test"] = {name: float(cost[test.labels == c].mean()) if (test.labels == c).any() else None
                             for c, name in enumerate(test.class_names)}
    return out
