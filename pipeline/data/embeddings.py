"""The embeddings table: one row per image with the final block's CLS input and gate decisions.

Layout of data/embeddings/{train,test}.parquet (written by the `extract` stage):

| column        | type                              | meaning                                    |
|---------------|-----------------------------------|--------------------------------------------|
| index         | int64                             | the image's `index` in data/dataset/<split> (its position in the source split) |
| label         | int32                             | true class                                 |
| prediction    | int32                             | the gated model's eval-mode prediction      |
| correct       | bool                              | prediction == label                        |
| gate_logits   | fixed_size_list<float32>[H]       | final block's decision-network logits      |
| gates         | fixed_size_list<bool>[H]          | final block's eval gates (logit > 0)       |
| x             | fixed_size_list<float32>[D]       | CLS token entering the final block          |
| x_block<i>    | fixed_size_list<float32>[D]       | CLS token entering block i (extract.layers)|
| kept_per_block| fixed_size_list<int8>[G]          | heads kept in each of the G gated blocks (for FLOPs per image; absent in files written before it) |

Schema metadata (JSON values): `model_hash`, `layer` (index of the final block), `dim` (D),
`num_heads` (H), `class_names`, `split`, `extra_layers`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.errors import PipelineError
from pipeline.storage import read_table, with_metadata

REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "index": pa.int64(),
    "label": pa.int32(),
    "prediction": pa.int32(),
    "correct": pa.bool_(),
    "gate_logits": pa.list_(pa.float32(), 1),
    "gates": pa.list_(pa.bool_(), 1),
    "x": pa.list_(pa.float32(), 1),
}


def embedding_schema(dim: int, num_heads: int, extra_layers: list[int], meta: dict[str, Any], gated_blocks: int = 0) -> pa.Schema:
    fields = [
        pa.field("index", pa.int64()),
        pa.field("label", pa.int32()),
        pa.field("prediction", pa.int32()),
        pa.field("correct", pa.bool_()),
        pa.field("gate_logits", pa.list_(pa.float32(), num_heads)),
        pa.field("gates", pa.list_(pa.bool_(), num_heads)),
        pa.field("x", pa.list_(pa.float32(), dim)),
    ]
    fields += [pa.field(f"x_block{i}", pa.list_(pa.float32(), dim)) for i in extra_layers]
    if gated_blocks:
        fields.append(pa.field("kept_per_block", pa.list_(pa.int8(), gated_blocks)))
    return with_metadata(pa.schema(fields), meta)


def fixed_list_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list column as an (N, width) numpy array, zero-copy when Arrow allows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    width = column.type.list_size
    values = column.flatten()
    if pa.types.is_boolean(values.type):
        flat = values.to_numpy(zero_copy_only=False)
    else:
        flat = values.to_numpy(zero_copy_only=column.null_count == 0 and values.null_count == 0)
    return flat.reshape(len(column), width)


@dataclass(frozen=True)
class EmbeddingTable:
    """An embeddings file in memory, as torch tensors."""

    x: torch.Tensor
    """(N, D) float32: CLS token entering the final block."""
    labels: torch.Tensor
    """(N,) int64 true classes."""
    predictions: torch.Tensor
    """(N,) int64 eval-mode predictions."""
    gate_logits: torch.Tensor
    """(N, H) float32 final-block decision logits."""
    gates: torch.Tensor
    """(N, H) bool final-block eval gates."""
    index: torch.Tensor
    """(N,) int64 rows in the data set."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Schema metadata: model_hash, layer, dim, num_heads, class_names, split, extra_layers."""
    kept_per_block: torch.Tensor | None = None
    """(N, G) int8 heads kept in each gated block, when the file has the column."""
    """Schema metadata: model_hash, layer, dim, num_heads, class_names, split, extra_layers."""

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).double().mean())

    @property
    def head_usage(self) -> float:
        return float(self.gates.double().mean())


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Zero-copy views of Arrow buffers are read-only; torch warns about that on every call.
    # The tables are treated as immutable, so the view is shared rather than copied.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def read_embeddings(path: Path | str, block: int | None = None) -> EmbeddingTable:
    """Read an embeddings file; a missing, truncated or mismatched file is a clear PipelineError.

    `block`: the CLS inputs of that block as `x` (column `x_block<block>`, or `x` for the final
    block); the gate columns stay the final block's. `x` shares memory with the Arrow buffers
    when Arrow allows (no copy): treat it as read-only.
    """
    column = "x" if block is None else f"x_block{block}"
    table, meta = read_table(path, REQUIRED_COLUMNS, optional=("kept_per_block", column))
    for key in ("dim", "num_heads", "class_names", "layer"):
        if key not in meta:
            raise PipelineError(f"{path}: schema metadata lacks '{key}'; not written by `extract`")
    if block is not None and block == meta["layer"]:
        column = "x"
    if column not in table.column_names:
        raise PipelineError(f"{path} has no CLS inputs of block {block} (column {column}); add {block} to "
                            "extract.layers and rerun extract")
    x = fixed_list_to_numpy(table.column(column))
    if x.shape[1] != meta["dim"]:
        raise PipelineError(f"{path}: column '{column}' has width {x.shape[1]} but metadata says dim={meta['dim']}")
    if x.shape[0] == 0:
        raise PipelineError(f"{path}: holds no rows")
    return EmbeddingTable(
        x=_tensor(x),
        labels=_tensor(table.column("label").to_numpy().astype(np.int64)),
        predictions=_tensor(table.column("prediction").to_numpy().astype(np.int64)),
        gate_logits=_tensor(fixed_list_to_numpy(table.column("gate_logits"))),
        gates=_tensor(fixed_list_to_numpy(table.column("gates")).astype(bool)),
        index=_tensor(table.column("index").to_numpy()),
        meta=meta,
        kept_per_block=(_tensor(fixed_list_to_numpy(table.column("kept_per_block"))) if "kept_per_block" in table.column_names else None),
    )
