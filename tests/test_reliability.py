"""Reliability across the whole pipeline: what a user of a shared pipeline can trust.

1. Bad parameters: hypothesis mutates the tiny params (wrong types, out-of-range numbers,
   unknown keys, missing sections, inconsistent pairs) and every command exits 2 with a
   one-line message naming the key, no traceback, nothing written. Values that only the data
   can refute (sae.k > expansion * D, ...) exit 2 too, before anything is written.
2. Bad data: a missing, empty, truncated or schema-mismatched input of every stage, a corrupt
   image in an image folder and embeddings whose width differs from the SAE's exit 1 with a
   message naming the file and what is wrong, and leave every file as it was.
3. Interruptions: a stage SIGKILLed mid-write (or at the last moment, output complete in its
   temporary but not moved into place) leaves no partial output: the output is absent or the
   previous complete version, and a rerun gives the bytes of an uninterrupted run.
4. Resume: finetune killed after epoch 1 of 3 and resumed ends with the uninterrupted run's
   weights, bit for bit, on the CPU; a checkpoint of another run is not resumed.
5. Safe loading: a crafted pickle that would run code is refused as `model.checkpoint` and as
   the resume checkpoint, and no source file unpickles a shared artifact. (torchvision's
   CIFAR-100 reader unpickles the official archive after checking its md5: that download is
   the one pickle the pipeline reads, and it is not an artifact anyone else wrote.)

The counts of cases tried and failed are printed at the end of the run (tests/conftest.py).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel
from torch.optim.optimizer import register_optimizer_step_post_hook
from typer.testing import CliRunner

from pipeline.cli import app, call_stage
from pipeline.model import training
from pipeline.model.gated_vit import build_gated_vit, model_config
from pipeline.params.file import Params, parse_params
from pipeline.runtime import seed_everything
from pipeline.steering.strategies import STRATEGIES

from conftest import PARAMS_COMMANDS, REPO_ROOT, TINY_PARAMS, _merge, reliability_case

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PIPELINE_LOG": "WARNING", "PYTHONPATH": str(REPO_ROOT)}
KILL_TIMEOUT = 300  # seconds a subprocess may take to reach the point where it is killed


# ------------------------------------------------------------------------------------ helpers
def write_params(path: Path | str, raw: Any) -> None:
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))


def tree(root: Path | str) -> dict[str, bytes]:
    """Every file under `root` (hidden temporaries included) -> its bytes."""
    root = Path(root)
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_clean_failure(result: Any, code: int) -> str:
    """Exit `code` through the CLI's error path: one `error: ...` line, no traceback."""
    out = result.output
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not crashed, f"uncaught {type(result.exception).__name__}: {result.exception}"
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}: {out!r}"
    assert "Traceback" not in out, out
    text = out.strip()
    assert text.startswith("error: ") and "\n" not in text, f"not a one-paragraph message: {out!r}"
    return text


@contextlib.contextmanager
def cwd(path: Path | str) -> Iterator[None]:
    """contextlib.chdir, which Python 3.10 lacks."""
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_stage(command: str, raw: dict[str, Any], directory: Path) -> None:
    """Run one stage in-process in `directory` (the uninterrupted reference)."""
    with cwd(directory):
        call_stage(command.replace("-", "_"), parse_params(raw, "params"))


# =============================================================== 1. bad parameters (hypothesis)
@dataclass(frozen=True)
class Leaf:
    """A key of params.yaml and what it accepts, read off the pydantic models."""

    path: tuple[str, ...]
    kind: str  # int, float, bool, str, path, literal, list, section, name_or_list
    nullable: bool = False
    bounds: dict[str, float] = field(default_factory=dict)  # ge / gt / le / lt
    choices: tuple[Any, ...] = ()
    item: Leaf | None = None

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


def _leaf(path: tuple[str, ...], annotation: Any, metadata: list[Any]) -> Leaf:
    nullable = False
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(get_args(annotation))
        if len(args) > 1:  # a name or a list (steer.blocks): wrong for every form
            names = tuple(c for a in args if get_origin(a) is Literal for c in get_args(a))
            return Leaf(path, "name_or_list", nullable, {}, names)
        (annotation,) = args
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        metadata = [*metadata, *(m for e in extra for m in getattr(e, "metadata", [e]))]
    bounds = {b: getattr(m, b) for m in metadata for b in ("ge", "gt", "le", "lt") if getattr(m, b, None) is not None}
    origin = get_origin(annotation)
    if origin is Literal:
        return Leaf(path, "literal", nullable, bounds, get_args(annotation))
    if origin is list:
        return Leaf(path, "list", nullable, bounds, item=_leaf(path, get_args(annotation)[0], []))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return Leaf(path, "section", nullable)
    kinds = {bool: "bool", int: "int", float: "float", str: "str"}
    if annotation in kinds:
        return Leaf(path, kinds[annotation], nullable, bounds)
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return Leaf(path, "path", nullable, bounds)
    raise TypeError(f"{'.'.join(path)}: no bad values known for {annotation!r}; extend the test")


def params_leaves(model: type[BaseModel] = Params, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every key of params.yaml, sections included, from the models themselves (new keys join)."""
    for name, info in model.model_fields.items():
        leaf = _leaf((*prefix, name), info.annotation, list(info.metadata))
        yield leaf
        if leaf.kind == "section":
            yield from params_leaves(info.annotation, leaf.path)


LEAVES = list(params_leaves())
SECTIONS = [()] + [leaf.path for leaf in LEAVES if leaf.kind == "section"]
BOUNDED = [leaf for leaf in LEAVES if leaf.bounds or (leaf.item is not None and leaf.item.bounds)]

# Values of the wrong type that pydantic's lax mode must still refuse (no "3" -> 3 here).
WRONG = {
    "int": ["many", 1.5, [1], {"a": 1}],
    "float": ["fast", [0.5], {"a": 1}],
    "bool": ["maybe", 2, 0.5, [True]],
    "str": [3, ["x"], {"a": 1}],
    "path": [3, ["x"], {"a": 1}],
    "literal": ["bogus", 7, ["x"]],
    "list": ["x", 3, {"a": 1}],
    "section": [3, "x", [1]],
    "name_or_list": ["bogus", 7, {"a": 1}, ["x"], [-1], []],
}


def wrong_values(leaf: Leaf) -> list[Any]:
    values = [v for v in WRONG[leaf.kind] if v not in leaf.choices]
    if leaf.kind == "list" and leaf.item is not None:
        values += [[wrong_values(leaf.item)[0]]]  # a list holding one bad element
    return values + ([] if leaf.nullable else [None])


def out_of_range(bounds: dict[str, float], kind: str, step: float) -> float:
    """A value `step` (> 0) beyond one of `bounds` (the first one)."""
    side, bound = next(iter(bounds.items()))
    if kind == "int":
        step = max(1, int(step))
        return {"ge": bound - step, "gt": bound - step + 1, "le": bound + step, "lt": bound + step - 1}[side]
    return {"ge": bound - step, "gt": bound - step, "le": bound + step, "lt": bound + step}[side]


@dataclass(frozen=True)
class BadParams:
    label: str
    raw: dict[str, Any]
    where: tuple[str, ...]
    """Dotted key paths the message must name (as `key = value`, `key.<i> = value` or `key: ...`)."""
    reason_keys: tuple[str, ...] = ()
    """For a cross-field check (reported on the section): the keys its reason must name."""


def mutated(path: tuple[str, ...], value: Any, base: dict[str, Any] = TINY_PARAMS) -> dict[str, Any]:
    raw = copy.deepcopy(base)
    node = raw
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return raw


def assert_names_key(message: str, case: BadParams) -> None:
    for where in case.where:
        assert re.search(rf"(?<![\w.]){re.escape(where)}(\.\d+)?( = |: )", message), (where, message)
    reason = message.rsplit("}: ", 1)[-1]  # after the echoed section, if any
    for key in case.reason_keys:
        assert re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", reason), (key, message)


def check_every_command(case: BadParams, directory: Path) -> None:
    """Each command exits 2 naming the key; the directory holds only the params file after."""
    write_params(directory / "params.yaml", case.raw)
    with cwd(directory):
        for command in PARAMS_COMMANDS:
            message = assert_clean_failure(runner.invoke(app, [*command.split(), "--params", "params.yaml"]), 2)
            assert_names_key(message, case)
    assert sorted(p.name for p in directory.rglob("*")) == ["params.yaml"], f"{case.label}: something was written"


# ---------------------------------------------------------------------- hypothesis strategies
@st.composite
def wrong_type(draw: st.DrawFn) -> BadParams:
    leaf = draw(st.sampled_from(LEAVES))
    value = draw(st.sampled_from(wrong_values(leaf)))
    return BadParams(f"wrong type {leaf.dotted}={value!r}", mutated(leaf.path, value), (leaf.dotted,))


@st.composite
def out_of_range_value(draw: st.DrawFn) -> BadParams:
    leaf = draw(st.sampled_from(BOUNDED))
    target = leaf.item if leaf.kind == "list" else leaf
    side = draw(st.sampled_from(sorted(target.bounds)))
    step = draw(st.floats(1e-3, 1e6, allow_nan=False) if target.kind == "float" else st.integers(1, 10**6))
    value = out_of_range({side: target.bounds[side]}, target.kind, step)
    value = [value] if leaf.kind == "list" else value
    return BadParams(f"out of range {leaf.dotted}={value!r}", mutated(leaf.path, value), (leaf.dotted,))


KEY_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)


@st.composite
def unknown_key(draw: st.DrawFn) -> BadParams:
    section = draw(st.sampled_from(SECTIONS))
    known = {leaf.path[-1] for leaf in LEAVES if leaf.path[:-1] == section}
    key = draw(KEY_NAME.filter(lambda k: k not in known))
    value = draw(st.one_of(st.integers(), st.booleans(), KEY_NAME))
    where = ".".join((*section, key))
    return BadParams(f"unknown key {where}", mutated((*section, key), value), (where,))


@st.composite
def missing_sections(draw: st.DrawFn) -> BadParams:
    names = draw(st.lists(st.sampled_from(list(Params.model_fields)), min_size=1, max_size=3, unique=True))
    raw = {k: v for k, v in copy.deepcopy(TINY_PARAMS).items() if k not in names}
    return BadParams(f"missing {names}", raw, tuple(names))


def _pair(section: str, keys: tuple[str, ...], overrides: dict[str, Any]) -> BadParams:
    label = f"inconsistent {section}: {overrides}"
    return BadParams(label, _merge(TINY_PARAMS, {section: overrides}), (section,), keys)


@st.composite
def inconsistent_pair(draw: st.DrawFn) -> BadParams:
    """Values each valid alone, refused together (the cross-field checks)."""
    ints, floats = st.integers, lambda lo, hi: st.floats(lo, hi, allow_nan=False)
    kind = draw(st.integers(0, 15))
    if kind == 0:
        n = draw(ints(1, 64))
        return _pair("sae", ("k", "n_latents"), {"n_latents": n, "k": n + draw(ints(1, 64))})
    if kind == 1:
        n = draw(ints(1, 64))
        return _pair("sae", ("k_aux", "n_latents"), {"n_latents": n, "k": 1, "k_aux": n + draw(ints(1, 64))})
    if kind == 2:
        return _pair("steer", ("alphas",), {"alphas": []})
    if kind == 3:
        a = draw(floats(-1, 10))
        return _pair("steer", ("alphas",), {"alphas": [a, 0.5, a]})
    if kind == 4:
        return _pair("steer", ("strategies",), {"strategies": []})
    if kind == 5:
        s = draw(st.sampled_from(["per_class", "global", "random"]))
        return _pair("steer", ("strategies",), {"strategies": [s, s]})
    if kind == 6:  # an unknown strategy is a field error on the list element
        name = draw(KEY_NAME.filter(lambda k: k not in STRATEGIES))
        return BadParams(f"unknown strategy {name}", mutated(("steer", "strategies"), ["global", name]), ("steer.strategies",))
    if kind == 7:
        return _pair("steer", ("mode", "alphas"), {"mode": "scale", "alphas": [0.0, draw(floats(-1e6, -1.001))]})
    if kind == 8:  # sizes >= 8 (the field's own bound) with a remainder
        p = draw(ints(2, 16))
        img = p * draw(ints(8 // p + 1, 16)) + draw(ints(1, p - 1))
        return _pair("model", ("img_size", "patch_size"), {"img_size": img, "patch_size": p})
    if kind == 9:
        h = draw(ints(2, 12))
        dim = h * draw(ints(8 // h + 1, 16)) + draw(ints(1, h - 1))
        return _pair("model", ("embed_dim", "num_heads"), {"embed_dim": dim, "num_heads": h})
    if kind == 10:
        depth = draw(ints(2, 12))
        return _pair("model", ("keep_layers", "depth"), {"depth": depth, "keep_layers": depth + draw(ints(0, 4))})
    if kind == 11:
        return _pair("model", ("pretrained", "checkpoint"), {"pretrained": True, "checkpoint": draw(KEY_NAME) + ".pth"})
    if kind == 12:
        lr = draw(floats(1e-6, 1.0))
        return _pair("finetune", ("min_lr", "lr"), {"lr": lr, "min_lr": lr * (1 + draw(floats(0.01, 100)))})
    if kind == 13:
        epochs = draw(ints(1, 5))
        return _pair("finetune", ("warmup_epochs", "epochs"), {"epochs": epochs, "warmup_epochs": epochs + draw(floats(0.01, 10))})
    if kind == 14:
        nproc = draw(ints(2, 8))
        return _pair("finetune", ("batch_size", "nproc"), {"nproc": nproc, "batch_size": nproc * draw(ints(1, 32)) + draw(ints(1, nproc - 1))})
    return _pair("data", ("source", "path"), {"source": "imagefolder", "path": None})


BAD_PARAMS = st.one_of(wrong_type(), out_of_range_value(), unknown_key(), missing_sections(), inconsistent_pair())


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=BAD_PARAMS)
def test_bad_parameters_exit_2_naming_the_key_and_write_nothing(case: BadParams) -> None:
    with reliability_case(), tempfile.TemporaryDirectory() as tmp:
        check_every_command(case, Path(tmp))


@pytest.mark.parametrize("leaf", LEAVES, ids=[leaf.dotted for leaf in LEAVES])
def test_every_key_refuses_a_wrong_type_and_an_out_of_range_value(leaf: Leaf, tmp_path: Path) -> None:
    """The deterministic sweep next to the random one: every key of params.yaml, once each."""
    cases = [BadParams("wrong type", mutated(leaf.path, wrong_values(leaf)[0]), (leaf.dotted,))]
    target = leaf.item if leaf.kind == "list" else leaf
    if target is not None and target.bounds:
        value = out_of_range(target.bounds, target.kind, 1.0)
        cases.append(BadParams("out of range", mutated(leaf.path, [value] if leaf.kind == "list" else value), (leaf.dotted,)))
    for i, case in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        check_every_command(case, tmp_path / str(i))


def test_the_leaf_table_covers_the_params_models() -> None:
    # If introspection silently found nothing, the tests above would prove nothing.
    dotted = {leaf.dotted for leaf in LEAVES}
    assert {"sae.k", "data.synthetic.num_classes", "finetune.augment.crop_padding", "steer.alphas", "model.checkpoint"} <= dotted
    assert next(leaf for leaf in LEAVES if leaf.dotted == "sae.k").bounds == {"ge": 1}
    assert next(leaf for leaf in LEAVES if leaf.dotted == "extract.layers").item.bounds == {"ge": 0}
    assert next(leaf for leaf in LEAVES if leaf.dotted == "data.max_per_class").nullable
    assert len(BOUNDED) >= 25


def test_bad_parameters_in_a_real_process(tmp_path: Path) -> None:
    write_params(tmp_path / "bad.yaml", mutated(("finetune", "epochs"), "three"))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train-sae", "--params", "bad.yaml"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=KILL_TIMEOUT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "finetune.epochs = 'three'" in proc.stderr, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


# ============================================================ the tiny pipeline, run once
@pytest.fixture(scope="module")
def pipeline_dir(tiny_run: Path) -> Path:
    """Every stage's outputs for the tiny params, made in-process once per session (`tiny_run`,
    tests/conftest.py, which tests/test_explorer.py reads too)."""
    return tiny_run


@pytest.fixture
def work(pipeline_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the pipeline's outputs, the current directory of the test."""
    target = tmp_path / "work"
    shutil.copytree(pipeline_dir, target)
    monkeypatch.chdir(target)
    return target


# -------------------------------------------------- parameters that only the data can refute
DATA_DEPENDENT = [
    ("train-sae", {"sae": {"k": 1000}}, "sae.k = 1000"),  # > expansion * D = 2 * 24
    ("train-sae", {"sae": {"k_aux": 1000}}, "sae.k_aux = 1000"),
    ("latent-stats", {"stats": {"top_k": 1000}}, "stats.top_k = 1000"),  # > the SAE's 48 latents
    ("extract", {"extract": {"layers": [0, 7]}}, "extract.layers = [0, 7]"),  # the model has 2 blocks
    ("finetune", {"model": {"name": "no_such_vit"}}, "model.name = 'no_such_vit'"),
    ("finetune", {"model": {"name": "resnet18"}}, "model.name = 'resnet18'"),
    ("finetune", {"model": {"name": "vit_tiny_patch16_224", "depth": None, "keep_layers": 12}}, "model.keep_layers = 12"),
]


@pytest.mark.parametrize(("command", "overrides", "needle"), DATA_DEPENDENT, ids=[c[2] for c in DATA_DEPENDENT])
def test_parameters_refuted_by_the_data_exit_2_before_writing(work: Path, command: str, overrides: dict, needle: str) -> None:
    write_params("params.yaml", _merge(TINY_PARAMS, overrides))
    before = tree(work)
    message = assert_clean_failure(runner.invoke(app, [command]), 2)
    assert needle in message, message
    assert tree(work) == before


# ================================================================================ 2. bad data
def _missing(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_column(column: str) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        pq.write_table(pq.read_table(path).drop_columns([column]), path)

    corrupt.__name__ = f"no_{column}"
    return corrupt


def _retype_label(path: Path) -> None:
    table = pq.read_table(path)
    i = table.schema.get_field_index("label")
    pq.write_table(table.set_column(i, pa.field("label", pa.int64()), table.column("label").cast(pa.int64())), path)


def _widen_x(path: Path) -> None:
    """Embeddings one wider than the SAE's (column and metadata agree, so only the SAE can tell)."""
    table = pq.read_table(path)
    x = np.stack(table.column("x").to_numpy(zero_copy_only=False))
    x = np.concatenate([x, np.zeros((len(x), 1), np.float32)], axis=1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    meta = {**table.schema.metadata, b"dim": str(x.shape[1]).encode()}
    table = table.set_column(table.schema.get_field_index("x"), pa.field("x", column.type), column)
    pq.write_table(table.replace_schema_metadata(meta), path)


def _json(**changes: Any) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    corrupt.__name__ = "json_" + "_".join(changes)
    return corrupt


def _json_empty_object(path: Path) -> None:
    path.write_text("{}")


def _pickle_bytes(path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, path)  # a torch/pickle file where safetensors belongs


MISSING, UNREADABLE = r"missing", r"not a readable|not a valid|not valid|truncated|corrupt|incomplete|too small"
SCHEMA = r"column '\w+'"


def _cases() -> list[tuple[str, str, Callable[[Path], None], str, str]]:
    """(command, corrupted file, corruption, what the message says, path the message names)."""
    parquet = [(_missing, MISSING), (_empty, UNREADABLE), (_truncated, UNREADABLE), (_retype_label, SCHEMA)]
    cases = []
    readers = {
        "data/dataset/train.parquet": ["finetune", "extract", "interpret"],
        "data/dataset/test.parquet": ["finetune", "extract", "steer"],
        "data/embeddings/train.parquet": ["train-sae", "latent-stats", "interpret"],
        "data/embeddings/test.parquet": ["train-sae", "latent-stats", "interpret", "steer"],
    }
    for path, commands in readers.items():
        extra = [(_drop_column("image"), SCHEMA)] if "dataset" in path else [(_drop_column("x"), SCHEMA), (_widen_x, r"dim|width")]
        for command in commands:
            cases += [(command, path, fn, what, path) for fn, what in parquet + extra]
    for command in ("extract", "interpret", "steer"):
        cases += [
            (command, "models/vit", _missing, MISSING, "models/vit"),
            (command, "models/vit/config.json", _missing, MISSING, "models/vit/config.json"),
            (command, "models/vit/config.json", _truncated, UNREADABLE, "models/vit/config.json"),
            (command, "models/vit/config.json", _json_empty_object, r"cannot rebuild", "models/vit/config.json"),
            (command, "models/vit/config.json", _json(timm_name="no_such_vit"), r"cannot rebuild", "models/vit/config.json"),
            (command, "models/vit/config.json", _json(shape={"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3}),
             r"does not fit", "models/vit"),
            (command, "models/vit/model.safetensors", _missing, MISSING, "models/vit/model.safetensors"),
            (command, "models/vit/model.safetensors", _empty, UNREADABLE, "models/vit/model.safetensors"),
            (command, "models/vit/model.safetensors", _truncated, UNREADABLE, "models/vit/model.safetensors"),
            (command, "models/vit/model.safetensors", _pickle_bytes, UNREADABLE, "models/vit/model.safetensors"),
        ]
    for command in ("latent-stats", "interpret", "steer"):
        cases += [
            (command, "models/sae", _missing, MISSING, "models/sae"),
            (command, "models/sae/config.json", _empty, UNREADABLE, "models/sae/config.json"),
            (command, "models/sae/config.json", _json(dim=None), r"bad or missing", "models/sae/config.json"),
            (command, "models/sae/config.json", _json(dim=30), r"shape", "models/sae"),
            (command, "models/sae/model.safetensors", _truncated, UNREADABLE, "models/sae/model.safetensors"),
            (command, "models/sae/model.safetensors", _pickle_bytes, UNREADABLE, "models/sae/model.safetensors"),
        ]
    top_sets = "data/stats/top_sets.json"
    cases += [
        ("steer", top_sets, _missing, MISSING, top_sets),
        ("steer", top_sets, _empty, UNREADABLE, top_sets),
        ("steer", top_sets, _truncated, UNREADABLE, top_sets),
        ("steer", top_sets, _json(per_class={}), r"malformed", top_sets),
        ("steer", top_sets, _json(n_latents=3), r"latents", top_sets),
        ("interpret", top_sets, _missing, MISSING, top_sets),
        ("interpret", top_sets, _truncated, UNREADABLE, top_sets),
        ("interpret", top_sets, _json(per_class={}), r"malformed", top_sets),
    ]
    return cases


BAD_DATA = _cases()


@pytest.mark.parametrize(("command", "target", "corrupt", "what", "named"), BAD_DATA,
                         ids=[f"{c[0]}:{c[1]}:{c[2].__name__.strip('_')}" for c in BAD_DATA])
def test_bad_input_file_names_the_file_and_changes_nothing(work: Path, command: str, target: str,
                                                          corrupt: Callable[[Path], None], what: str, named: str) -> None:
    corrupt(Path(target))
    before = tree(work)
    message = assert_clean_failure(runner.invoke(app, [command]), 1)
    assert named in message and re.search(what, message), message
    assert tree(work) == before  # no output written, no temporary left behind


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_a_corrupt_image_in_an_image_folder_is_named(work: Path) -> None:
    for split in ("train", "test"):
        for name, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            for i in range(2):
                _png(work / "raw" / split / name / f"{i}.png", colour)
    write_params("params.yaml", _merge(TINY_PARAMS, {"data": {"source": "imagefolder", "path": "raw", "val_per_class": 1}}))
    assert runner.invoke(app, ["download"]).exit_code == 0  # the intact folder is fine
    bad = Path("raw/train/dog/1.png")
    bad.write_bytes(bad.read_bytes()[:30])  # a PNG cut off inside its header
    before = tree(work)
    message = assert_clean_failure(runner.invoke(app, ["download"]), 1)
    assert str(bad) in message and "cannot be read as an image" in message, message
    assert tree(work) == before  # data/dataset is still the complete previous one


@pytest.mark.parametrize(("name", "make", "what"), [
    ("w.pth", lambda p: None, MISSING),
    ("w.pth", _empty, r"rejected"),
    ("w.pth", lambda p: (torch.save({"pos_embed": torch.zeros(1, 17, 24)}, p), _truncated(p)), r"rejected"),
    ("w.pth", lambda p: torch.save({"epoch": 3, "note": "no tensors"}, p), r"not a state dict of tensors"),
    ("w.pth", lambda p: torch.save({"blocks.0.attn.qkv.weight": torch.zeros(5, 5)}, p), r"does not fit.*qkv"),
    ("w.safetensors", _empty, r"not a valid safetensors"),
], ids=["missing", "empty", "truncated", "not-tensors", "wrong-shape", "empty-safetensors"])
def test_a_bad_initial_checkpoint_is_named(work: Path, name: str, make: Callable[[Path], Any], what: str) -> None:
    path = work / name
    make(path)
    write_params("params.yaml", _merge(TINY_PARAMS, {"model": {"checkpoint": name}}))
    before = tree(work)
    message = assert_clean_failure(runner.invoke(app, ["finetune"]), 1)
    assert name in message and re.search(what, message), message
    assert tree(work) == before


@pytest.mark.parametrize("corrupt", [_empty, _truncated], ids=["empty", "truncated"])
def test_a_damaged_resume_checkpoint_is_named(work: Path, corrupt: Callable[[Path], None]) -> None:
    corrupt(Path("models/vit_ckpt/last.pt"))
    write_params("params.yaml", _merge(TINY_PARAMS, {"finetune": {"resume": True}}))
    before = tree(work)
    message = assert_clean_failure(runner.invoke(app, ["finetune"]), 1)
    assert "models/vit_ckpt/last.pt" in message and "rejected" in message, message
    assert tree(work) == before


# ============================================================================ 3. interruptions
# Run in a real process, stopped by an audit hook (test code, not product code) just before it
# moves its Nth matching temporary into place: that output is then complete but not committed,
# the last moment a kill can hit. The test inspects it, then sends SIGKILL.
STOP_BEFORE_COMMIT = r"""
import os, re, runpy, signal, sys
pattern, left = re.compile(sys.argv[1]), [int(sys.argv[2])]

def stop_before_commit(event, args):
    if event == "os.rename" and pattern.search(os.fsdecode(args[0])):  # os.rename and os.replace
        left[0] -= 1
        if left[0] == 0:
            os.kill(os.getpid(), signal.SIGSTOP)

sys.addaudithook(stop_before_commit)
sys.argv = ["pipeline", *sys.argv[3:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


@contextlib.contextmanager
def stopped_before_commit(args: list[str], output: str, nth: int = 1) -> Iterator[subprocess.Popen]:
    """Yield a `pipeline <args>` process stopped before the `nth` commit of `output`; SIGKILL it after."""
    name = re.escape(Path(output).name)
    log = open("stage.log", "w+")  # noqa: SIM115 - read back on failure
    proc = subprocess.Popen([sys.executable, "-c", STOP_BEFORE_COMMIT, rf"(^|/)\.{name}\.tmp-\d+$", str(nth), *args],
                            env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + KILL_TIMEOUT
        while True:
            pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
            if pid and os.WIFSTOPPED(status):
                break
            if pid:  # it ended without reaching the commit
                proc.returncode = os.waitstatus_to_exitcode(status)
                log.seek(0)
                pytest.fail(f"stage ended ({proc.returncode}) before committing {output}: {log.read()[-2000:]}")
            assert time.monotonic() < deadline, f"{args} did not reach the commit of {output}"
            time.sleep(0.01)
        yield proc
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        Path("stage.log").unlink()
    assert proc.returncode == -signal.SIGKILL


KILLED = [
    ("download", "data/dataset", {"data": {"seed": 1}}, ["metrics/dataset.json"]),
    ("train-sae", "models/sae", {"sae": {"seed": 1}}, ["metrics/details/sae.json"]),
    pytest.param("finetune", "models/vit", {"finetune": {"seed": 1}}, ["metrics/details/finetune.json"],
                 marks=pytest.mark.slow),
    pytest.param("extract", "data/embeddings", {"extract": {"batch_size": 7}}, ["metrics/details/extract.json"], marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("command", "output", "overrides", "also"), KILLED, ids=["download", "train-sae", "finetune", "extract"])
def test_a_stage_killed_before_its_commit_leaves_no_partial_output(work: Path, tmp_path: Path, command: str, output: str,
                                                                 overrides: dict, also: list[str]) -> None:
    raw = _merge(TINY_PARAMS, overrides)
    reference = tmp_path / "reference"
    shutil.copytree(work, reference)
    run_stage(command, raw, reference)
    expected = {path: tree(reference / path) for path in (output, *also)}
    previous = {path: tree(path) for path in (output, *also)}
    assert expected[output] != previous[output], "the new parameters must change the output"

    write_params("new.yaml", raw)
    with stopped_before_commit([command, "--params", "new.yaml"], output) as proc:
        temporary = Path(output).with_name(f".{Path(output).name}.tmp-{proc.pid}")
        assert tree(temporary) == expected[output]  # complete, and byte-identical to the reference
    # killed: the output is the previous complete version or absent, never the new one in part
    assert not Path(output).exists() or tree(output) == previous[output]
    for path in also:  # written after the output: untouched
        assert tree(path) == previous[path]

    run_stage(command, raw, work)  # the rerun clears the debris and gives the uninterrupted bytes
    assert {path: tree(path) for path in (output, *also)} == expected
    assert not list(Path(output).parent.glob(f".{Path(output).name}.*"))


def test_download_killed_mid_write_keeps_the_previous_data_set(work: Path, tmp_path: Path) -> None:
    """A real SIGKILL while the Parquet files are being written (no stopping point needed)."""
    raw = _merge(TINY_PARAMS, {"data": {"synthetic": {"num_classes": 10, "train_per_class": 200, "test_per_class": 20, "image_size": 32}}})
    previous = tree("data/dataset")
    write_params("big.yaml", raw)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "download", "--params", "big.yaml"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = Path(f"data/.dataset.tmp-{proc.pid}/train.parquet")
    deadline = time.monotonic() + KILL_TIMEOUT
    try:
        while not partial.exists():
            assert proc.poll() is None, "download ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    written = sorted(partial.parent.iterdir())
    unreadable = []
    for path in written:
        with contextlib.suppress(pa.ArrowException, OSError):
            pq.read_table(path)
            continue
        unreadable.append(path.name)
    assert unreadable, f"killed too late: {written} were complete"  # it was killed mid-write
    assert tree("data/dataset") == previous

    reference = tmp_path / "reference"
    reference.mkdir()
    run_stage("download", raw, reference)
    run_stage("download", raw, work)
    assert tree("data/dataset") == tree(reference / "data/dataset")
    assert not partial.parent.exists()


# ================================================================================== 4. resume
RESUMABLE = {"finetune": {"epochs": 3, "resume": True}}
FINETUNE_OUTPUTS = ("models/vit", "metrics/finetune", "metrics/details/finetune.json")
"""metrics/finetune: the DVCLive log, the headline and every per-epoch curve (a resumed run
replays the restored epochs into it)."""


def _finetune_outputs(root: Path) -> dict[str, dict[str, bytes]]:
    return {path: tree(root / path) for path in FINETUNE_OUTPUTS}


@pytest.mark.slow
def test_finetune_killed_after_epoch_1_resumes_to_the_uninterrupted_weights(work: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    raw = _merge(TINY_PARAMS, RESUMABLE)
    shutil.rmtree("models/vit_ckpt")
    reference = tmp_path / "reference"
    shutil.copytree(work, reference)
    run_stage("finetune", raw, reference)
    expected = _finetune_outputs(reference)
    previous = tree("models/vit")

    write_params("resume.yaml", raw)
    # stopped while committing epoch 2's checkpoint: last.pt holds epoch 1, then SIGKILL
    with stopped_before_commit(["finetune", "--params", "resume.yaml"], "models/vit_ckpt/last.pt", nth=2):
        pass
    checkpoint = torch.load("models/vit_ckpt/last.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1 and len(checkpoint["history"]) == 1
    assert tree("models/vit") == previous

    caplog.set_level("INFO", logger="pipeline.model.training")
    run_stage("finetune", raw, work)
    assert "after epoch 1" in caplog.text  # it did resume (a fresh run would give the same bytes)
    resumed = _finetune_outputs(work)
    assert resumed["models/vit"] == expected["models/vit"]  # bitwise equal weights
    assert resumed == expected  # and the same metrics and per-epoch curves
    assert sorted(p.name for p in Path("models/vit_ckpt").iterdir()) == ["last.pt"]  # no debris


@pytest.mark.slow
def test_resume_ignores_a_checkpoint_made_with_other_parameters(work: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """DVC keeps models/vit_ckpt across parameter changes: resuming it would return the old run."""
    old = _merge(TINY_PARAMS, {"finetune": {"epochs": 2, "resume": True, "lr": 0.002}})
    new = _merge(TINY_PARAMS, {"finetune": {"epochs": 2, "resume": True, "lr": 0.0005}})
    reference = tmp_path / "reference"
    shutil.copytree(work, reference)
    shutil.rmtree(reference / "models/vit_ckpt")
    run_stage("finetune", new, reference)

    run_stage("finetune", old, work)  # leaves a finished epoch-2 checkpoint of the old run
    caplog.clear()
    run_stage("finetune", new, work)
    assert "other parameters" in caplog.text
    assert tree("models/vit") == tree(reference / "models/vit")


class Killed(Exception):
    """Stands in for SIGKILL, raised by the test right after a checkpoint is on disk."""


def test_a_killed_train_resumes_from_the_checkpoint_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: train() killed right after its epoch-1 checkpoint (of 3 epochs) runs only the
    steps of epochs 2 and 3 when started again on a fresh model, keeps the checkpoint's first
    history row, and ends with an uninterrupted run's weights and history, bit for bit."""
    params = parse_params(_merge(TINY_PARAMS, RESUMABLE))
    fp = params.finetune
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    data = (images[:32], labels[:32], images[32:], labels[32:])  # 2 batches of 16 per epoch

    real_lr_at, real_checkpoint = training.lr_at, training._checkpoint
    schedule_steps: list[int] = []  # the step of every lr_at call (one per parameter group)

    def recording_lr_at(step: int, *args: Any) -> float:
        schedule_steps.append(step)
        return real_lr_at(step, *args)

    monkeypatch.setattr(training, "lr_at", recording_lr_at)

    def run(checkpoint: Path) -> tuple[torch.nn.Module, list[dict[str, float]], list[int], int]:
        """A fresh seeded model (as `finetune` builds it) trained with `checkpoint`: the model,
        the history, the schedule steps it ran and its optimizer steps."""
        seed_everything(fp.seed)
        model = build_gated_vit(params.model, num_classes=4, tau=fp.tau)
        config = model_config(params.model, model.vit, 4, ["a", "b", "c", "d"], fp.tau)
        schedule_steps.clear()
        opt_steps = []
        handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: opt_steps.append(1))
        try:
            history = training.train(model, *data, config, fp, torch.device("cpu"), checkpoint=checkpoint)
        finally:
            handle.remove()
        return model, history, sorted(set(schedule_steps)), len(opt_steps)

    def killed_after_epoch_1(path: Path, model: Any, opt: Any, gen: Any, state: Any, fingerprint: str) -> None:
        real_checkpoint(path, model, opt, gen, state, fingerprint)
        if state.epoch == 1:
            raise Killed

    checkpoint = tmp_path / "last.pt"
    (tmp_path / "reference").mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference, expected_history, steps, _ = run(tmp_path / "reference" / "last.pt")
        assert steps == list(range(6))  # 3 epochs of 2 steps

        monkeypatch.setattr(training, "_checkpoint", killed_after_epoch_1)
        with pytest.raises(Killed):
            run(checkpoint)
        assert schedule_steps and sorted(set(schedule_steps)) == [0, 1]  # killed after epoch 1
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        assert saved["epoch"] == 1 and len(saved["history"]) == 1

        monkeypatch.setattr(training, "_checkpoint", real_checkpoint)
        resumed, history, steps, opt_steps = run(checkpoint)
    finally:
        torch.set_num_threads(threads)

    assert steps == [2, 3, 4, 5] and opt_steps == 4  # epochs 2 and 3 only, from the schedule's step 2
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert history[0] == saved["history"][0]  # epoch 1 is the checkpoint's, not a rerun
    assert history == expected_history
    assert torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"] == 3
    expected = reference.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), f"{name} differs from the uninterrupted run"


# ============================================================================ 5. safe loading
class RunsCode:
    """Unpickling this calls os.mkdir(marker): what a crafted checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def malicious_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"model": {"pos_embed": torch.zeros(1), "payload": RunsCode(marker)}, "epoch": 1}, path)


def test_the_crafted_checkpoint_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    # The control for the tests below: the same file, loaded without weights_only, runs its payload.
    marker = tmp_path / "pwned"
    malicious_checkpoint(tmp_path / "evil.pth", marker)
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["evil.pth", "evil.bin", "evil.safetensors"])
def test_a_malicious_initial_checkpoint_is_rejected_without_running(work: Path, name: str) -> None:
    marker = work / "pwned"
    malicious_checkpoint(work / name, marker)
    write_params("params.yaml", _merge(TINY_PARAMS, {"model": {"checkpoint": name}}))
    before = tree(work)
    message = assert_clean_failure(runner.invoke(app, ["finetune"]), 1)
    assert name in message and re.search(r"rejected|not a valid safetensors", message), message
    assert not marker.exists()
    assert tree(work) == before


def test_a_malicious_resume_checkpoint_is_rejected_without_running(work: Path) -> None:
    marker = work / "pwned"
    malicious_checkpoint(Path("models/vit_ckpt/last.pt"), marker)
    write_params("params.yaml", _merge(TINY_PARAMS, {"finetune": {"resume": True}}))
    before = tree(work)
    message = assert_clean_failure(runner.invoke(app, ["finetune"]), 1)
    assert "models/vit_ckpt/last.pt" in message and "rejected" in message, message
    assert not marker.exists()
    assert tree(work) == before


UNPICKLERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_loads(source: str) -> list[str]:
    """Lines that can unpickle: pickle-like modules, torch.load without weights_only=True,
    numpy/pandas pickle readers."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(m.split(".")[0] in UNPICKLERS for m in modules):
                found.append(f"{node.lineno}: import {modules}")
        if isinstance(node, ast.Call):
            name, kwargs = _dotted(node.func), {k.arg: k.value for k in node.keywords}
            safe_torch = isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True
            pickled_numpy = isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value is True
            if (name.split(".")[0] in UNPICKLERS or name.endswith("read_pickle")
                    or (name.endswith("torch.load") and not safe_torch) or (name.endswith(".load") and pickled_numpy)):
                found.append(f"{node.lineno}: {name}")
    return found


def test_the_unpickling_scanner_finds_unsafe_loads() -> None:
    assert len(unsafe_loads("import pickle\npickle.loads(b)\ntorch.load(p)\nnp.load(p, allow_pickle=True)\n")) == 4
    assert unsafe_loads("torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\n") == []


def test_no_source_file_unpickles_an_artifact() -> None:
    files = sorted([*REPO_ROOT.glob("pipeline/**/*.py"), *REPO_ROOT.glob("bench/**/*.py")])
    assert len(files) > 10
    found = {str(f.relative_to(REPO_ROOT)): hits for f in files if (hits := unsafe_loads(f.read_text()))}
    assert found == {}
    # the checkpoint readers that do exist all pass weights_only=True (the scanner sees them)
    safe = sum(f.read_text().count("weights_only=True") for f in files)
    assert safe >= 1
