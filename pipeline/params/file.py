"""The whole `params.yaml`: the root model over every section, its validation at the edge, and
the parameter table `pipeline params-doc` prints.

Parameters are validated once, here (`load_params`); inner code receives the typed section
objects, never dicts. A bad value raises `ParamsError`, whose message names the key path, the
bad value and what is allowed; the CLI turns it into exit status 2. Only the CLI imports this
module: a stage receives the sections it reads, so that its code depends on those alone.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ValidationError, model_validator

from pipeline.errors import ParamsError
from pipeline.params.base import Section
from pipeline.params.ceiling import CeilingParams
from pipeline.params.data import DataParams
from pipeline.params.extract import ExtractParams
from pipeline.params.finetune import FinetuneParams
from pipeline.params.interpret import InterpretParams
from pipeline.params.latency import LatencyParams
from pipeline.params.model import ModelParams
from pipeline.params.sae import SaeParams
from pipeline.params.stats import StatsParams
from pipeline.params.steer import SteerParams


class Params(Section):
    """The whole `params.yaml`: one section per stage."""

    data: DataParams
    model: ModelParams
    finetune: FinetuneParams
    extract: ExtractParams
    sae: SaeParams
    stats: StatsParams
    interpret: InterpretParams
    steer: SteerParams
    ceiling: CeilingParams
    latency: LatencyParams

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.steer.select_on == "val" and self.data.val_per_class == 0:
            raise ValueError("steer.select_on 'val' needs a validation split: set data.val_per_class > 0, or select_on 'test'")
        return self


def _type_name(annotation: object) -> str:
    """A readable type for the parameter table: `int or null`, `one of 'scale', 'add'`, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return {Path: "path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def describe_params() -> str:
    """Every section and field with its type, default and documentation (Markdown)."""

    def walk(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                if prefix:
                    lines.append(f"| `{key}` | section | | {field.description or ''} |")
                walk(annotation, key, lines)
                continue
            kind = _type_name(annotation)
            default = "required" if field.is_required() else repr(field.default)
            lines.append(f"| `{key}` | {kind} | `{default}` | {(field.description or '').replace(chr(10), ' ')} |")

    out = []
    for section, field in Params.model_fields.items():
        model = field.annotation
        out += [f"### `{section}`", "", (model.__doc__ or "").strip(), "", "| key | type | default | meaning |", "|---|---|---|---|"]
        walk(model, section, out)
        out.append("")
    return "\n".join(out)


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where}: missing (this section or key is required)"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (value {error['input']!r}); check the spelling"
    if isinstance(error["input"], dict):  # a cross-field check: the reason names the keys
        return f"{where}: {message}"
    return f"{where} = {error['input']!r}: {message}"


def parse_params(raw: object, source: str = "params") -> Params:
    """Validate an already-loaded mapping; raise ParamsError with a one-paragraph message."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors(include_url=False)]
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise ParamsError(f"invalid parameters in {source}: {shown}") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(f"cannot read parameter file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_params(raw, str(path))
