"""How artifacts are stored: atomic outputs, JSON, Parquet, safetensors weights.

Rules kept here so no stage has to remember them:
- an output appears only when complete (written to a temporary sibling, then renamed);
- the same content gives the same bytes (sorted JSON keys, no timestamps, fixed row groups);
- nothing shared is ever unpickled (weights are safetensors plus a JSON config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import PipelineError


# ------------------------------------------------------------------------------ atomic writes
def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: Path | str, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path` to; move it into place only on success.

    With `directory=True` the temporary path is an empty directory. On an exception (or a kill)
    the final path is untouched: either the previous complete output or nothing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    _remove(tmp)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if directory:
            # a directory cannot be replaced atomically: move the old one aside first
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_json(path: Path | str, obj: Any) -> None:
    """Write JSON atomically, keys sorted, so that equal content gives equal bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: missing (run the stage that writes it first)") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def clean_outputs(*paths: Path | str) -> None:
    """Remove stale temporaries left by a killed run next to these outputs."""
    for path in map(Path, paths):
        if path.parent.exists():
            for stale in path.parent.glob(f".{path.name}.tmp-*"):
                _remove(stale)
            for stale in path.parent.glob(f".{path.name}.old-*"):
                _remove(stale)


# ------------------------------------------------------------------------------------ Parquet
def metadata_dict(schema: pa.Schema) -> dict[str, Any]:
    """Schema metadata, stored as JSON strings, decoded."""
    raw = schema.metadata or {}
    return {k.decode(): json.loads(v) for k, v in raw.items() if not k.startswith(b"ARROW")}


def with_metadata(schema: pa.Schema, meta: Mapping[str, Any]) -> pa.Schema:
    return schema.with_metadata({k: json.dumps(v, sort_keys=True) for k, v in meta.items()})


def parquet_writer(path: Path | str, schema: pa.Schema) -> pq.ParquetWriter:
    """A deterministic writer (zstd, no statistics on binary blobs, no creation timestamps)."""
    return pq.ParquetWriter(
        str(path),
        schema,
        compression="zstd",
        write_statistics=False,
        store_schema=True,
    )


def write_parquet(path: Path | str, table: pa.Table) -> None:
    """Write a small table atomically as one row group (deterministic, like `parquet_writer`)."""
    with atomic_path(path) as tmp:
        with parquet_writer(tmp, table.schema) as writer:
            writer.write_table(table, row_group_size=max(table.num_rows, 1))


def open_parquet(path: Path | str, required: Mapping[str, pa.DataType]) -> pq.ParquetFile:
    """Open a Parquet file and check it has the columns a stage needs, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: missing (run the stage that writes it first)")
    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(f"{path}: not a readable Parquet file ({exc}); rerun the stage that writes it") from None
    schema = pf.schema_arrow
    for name, dtype in required.items():
        if name not in schema.names:
            raise PipelineError(f"{path}: column '{name}' missing (has {schema.names}); schema mismatch")
        actual = schema.field(name).type
        if not _compatible(actual, dtype):
            raise PipelineError(f"{path}: column '{name}' has type {actual}, expected {dtype}")
    return pf


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if pa.types.is_fixed_size_list(expected):
        return pa.types.is_fixed_size_list(actual) and actual.value_type == expected.value_type
    return actual == expected


def read_table(path: Path | str, required: Mapping[str, pa.DataType], optional: tuple[str, ...] = (),
               every_column: bool = False) -> tuple[pa.Table, dict[str, Any]]:
    """Read a whole Parquet table (checked like `open_parquet`) plus its decoded metadata: the
    `required` columns and those of `optional` the file has (all columns if none are named, or
    with `every_column`)."""
    pf = open_parquet(path, required)
    present = [name for name in optional if name in pf.schema_arrow.names]
    try:
        table = pf.read(columns=None if every_column else (list(required) + present) or None)
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(f"{path}: cannot be read ({exc}); the file is truncated or corrupt") from None
    return table, metadata_dict(pf.schema_arrow)


# ------------------------------------------------------------------------------------ weights
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_weights(directory: Path | str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Write `directory/model.safetensors` and `directory/config.json` atomically, together."""
    with atomic_path(directory, directory=True) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_weights(directory: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read weights saved by `save_weights`. Never unpickles anything."""
    directory = Path(directory)
    config = read_json(directory / CONFIG_FILE)
    weights = directory / WEIGHTS_FILE
    if not weights.exists():
        raise PipelineError(f"{weights}: missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PipelineError(f"{weights}: not a valid safetensors file ({exc})") from None
    return state, config


def weights_sha256(directory: Path | str) -> str:
    """The SHA-256 of `directory/model.safetensors`: which weights a later artifact came from."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict_file(path: Path | str) -> dict[str, torch.Tensor]:
    """Load a user-supplied state dict: safetensors, or a torch file with `weights_only=True`.

    A torch file holding anything but tensors and plain containers (e.g. a crafted pickle that
    would run code) is rejected.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: checkpoint missing")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise PipelineError(f"{path}: not a valid safetensors file ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"{path}: rejected as a checkpoint (only plain tensors are loaded): {first}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path}: not a state dict of tensors")
    return state


# ------------------------------------------------------------------------------------ metrics
METRIC_DIGITS = 6
"""Significant digits of every float in a metrics file: readable JSON, and far below the
float noise that differs between CPU types anyway."""


def rounded(value: Any, digits: int = METRIC_DIGITS) -> Any:
    """Floats (also inside dicts and lists) to `digits` significant digits; a non-finite float
    becomes None, since JSON has no NaN (e.g. the FVU of a constant split is undefined)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


# ------------------------------------------------------------------ dataclasses <-> JSON
# A typed artifact is a dataclass tree; these two functions are its JSON form. Field metadata:
# `json` renames a field (e.g. `class`, a Python keyword), `omit_none` leaves a None field out
# instead of writing null (an optional section of the file).


def to_json_value(obj: Any) -> Any:
    """A dataclass tree (dataclasses, lists, tuples, dicts, scalars) as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.metadata.get("json", f.name)] = to_json_value(value)
        return out
    if isinstance(obj, dict):
        return {k: to_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_value(v) for v in obj]
    return obj


def from_json_value(kind: Any, raw: Any, where: str = "") -> Any:
    """Rebuild a value of type `kind` (a dataclass, `X | None`, `list[X]`, `tuple[X, ...]`,
    `dict[str, X]` or a scalar type) from JSON; a missing field or a wrong shape raises
    ValueError naming where."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return from_json_value(inner, raw, where)
    if dataclasses.is_dataclass(kind):
        if not isinstance(raw, dict):
            raise ValueError(f"{where or 'value'}: expected an object, got {type(raw).__name__}")
        hints = typing.get_type_hints(kind)
        values = {}
        for f in dataclasses.fields(kind):
            key = f.metadata.get("json", f.name)
            if key in raw:
                values[f.name] = from_json_value(hints[f.name], raw[key], f"{where}.{key}".lstrip("."))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}.{key}: missing".lstrip("."))
        return kind(**values)
    if origin in (list, tuple):
        if not isinstance(raw, list):
            raise ValueError(f"{where or 'value'}: expected a list, got {type(raw).__name__}")
        item = args[0] if args else Any
        values = [from_json_value(item, v, f"{where}[{i}]") for i, v in enumerate(raw)]
        return tuple(values) if origin is tuple else values
    if origin is dict:
        if not isinstance(raw, dict):
            raise ValueError(f"{where or 'value'}: expected an object, got {type(raw).__name__}")
        return {k: from_json_value(args[1], v, f"{where}.{k}") for k, v in raw.items()}
    if kind is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    if kind in (int, str, bool) and not isinstance(raw, kind):
        raise ValueError(f"{where or 'value'}: expected {kind.__name__}, got {raw!r}")
    return raw


def write_dataclass(path: Path | str, obj: Any) -> None:
    """A typed artifact as sorted-key JSON (the bytes `write_json` gives the same content)."""
    write_json(path, to_json_value(obj))


def read_dataclass(kind: type, path: Path | str, rerun: str) -> Any:
    """The typed artifact at `path`; a malformed file is a PipelineError naming the stage to rerun."""
    raw = read_json(path)
    try:
        return from_json_value(kind, raw)
    except (ValueError, TypeError) as exc:
        raise PipelineError(f"{path}: malformed ({exc}); rerun `{rerun}`") from None
