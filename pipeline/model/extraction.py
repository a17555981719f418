"""Run the gated ViT in eval mode and stream its per-image records into an embeddings file.

Memory stays bounded by one batch: each batch becomes one Parquet row group as soon as it is
computed. The columns are described in `pipeline.data.embeddings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from pipeline.data.embeddings import embedding_schema
from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import GatedViT
from pipeline.progress import progress
from pipeline.storage import parquet_writer


def _fixed_list(values: np.ndarray) -> pa.FixedSizeListArray:
    n, width = values.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width)


@torch.no_grad()
def batch_records(model: GatedViT, images: Tensor, config: ModelConfig, extra_layers: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One batch of uint8 images -> the columns of the embeddings table (without index/label)."""
    final = model.depth - 1
    x = config.preprocess(images)
    out = model(x, record=(final, *extra_layers))
    columns = {
        "prediction": out.logits.argmax(-1).int(),
        "gate_logits": out.gate_logits[:, -1].float(),
        "gates": out.gates[:, -1] > 0,
        "x": out.cls_inputs[final].float(),
        "kept_per_block": out.gates.sum(-1).to(torch.int8),
    }
    columns.update({f"x_block{i}": out.cls_inputs[i].float() for i in extra_layers})
    return {k: v.cpu().numpy() for k, v in columns.items()}


def extract_split(
    model: GatedViT,
    images: Tensor,
    labels: Tensor,
    index: Tensor,
    config: ModelConfig,
    out_path: Path,
    meta: dict[str, Any],
    batch_size: int,
    device: torch.device,
    extra_layers: tuple[int, ...] = (),
) -> None:
    """Write `out_path` (one row group per batch). `meta` goes into the schema metadata."""
    model.eval().to(device)
    dim, heads = model.vit.embed_dim, model.num_heads
    schema = embedding_schema(dim, heads, list(extra_layers), meta, gated_blocks=model.depth - model.keep_layers)
    # Arrow's default mimalloc pool keeps the pages of every freed batch next to torch's own
    # allocations, so memory grows with the data set; the system allocator keeps it flat
    # (BENCHMARKS.md, "Extraction", has the measurement).
    previous_pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        _write_batches(model, images, labels, index, config, out_path, schema, meta, batch_size, device, extra_layers)
    finally:
        pa.set_memory_pool(previous_pool)


def _write_batches(model, images, labels, index, config, out_path, schema, meta, batch_size, device, extra_layers) -> None:
    with parquet_writer(out_path, schema) as writer:
        starts = range(0, len(images), batch_size)
        for start in progress(starts, desc=f"extract {meta.get('split', '')}", unit="batch"):
            stop = start + batch_size
            cols = batch_records(model, images[start:stop].to(device), config, extra_layers)
            label = labels[start:stop].numpy().astype(np.int32)
            arrays = [
                pa.array(index[start:stop].numpy().astype(np.int64)),
                pa.array(label),
                pa.array(cols["prediction"]),
                pa.array(cols["prediction"] == label),
                _fixed_list(cols["gate_logits"]),
                _fixed_list(cols["gates"]),
                _fixed_list(cols["x"]),
            ] + [_fixed_list(cols[f"x_block{i}"]) for i in extra_layers] + [_fixed_list(cols["kept_per_block"])]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=batch_size)
