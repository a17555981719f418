"""Shared test fixtures. Nothing in the test suite may touch the network."""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Set before anything imports huggingface_hub, timm or DVC.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("PIPELINE_LOG", "WARNING")

from pipeline.params.file import Params, parse_params  # noqa: E402


def dvc_env() -> dict[str, str]:
    """Environment for `dvc`/`git` subprocesses: this venv's tools, nothing phoning home, and a
    git identity (CI machines may have none; DVC experiments commit)."""
    import sys

    return {
        **os.environ,
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "PIPELINE_LOG": "WARNING",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }


def write_embeddings(
    path: Path, x: Any, labels: Any, class_names: list[str], split: str, model_hash: str = "test", layer: int = 3
) -> None:
    """A valid embeddings file (the `extract` layout) holding the given (N, D) `x` and labels;
    2 heads, every gate on."""
    import numpy as np
    import pyarrow as pa

    from pipeline.data.embeddings import embedding_schema
    from pipeline.storage import parquet_writer

    x, labels = np.asarray(x), np.asarray(labels)
    n, dim = x.shape
    heads = 2
    meta = {"model_hash": model_hash, "layer": layer, "dim": dim, "num_heads": heads,
            "class_names": class_names, "split": split, "extra_layers": []}
    schema = embedding_schema(dim, heads, [], meta)
    columns = {
        "index": pa.array(np.arange(n), pa.int64()),
        "label": pa.array(labels, pa.int32()),
        "prediction": pa.array(labels, pa.int32()),
        "correct": pa.array(np.ones(n, bool)),
        "gate_logits": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * heads, np.float32)), heads),
        "gates": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n * heads, bool)), heads),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), dim),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with parquet_writer(path, schema) as writer:
        writer.write_table(pa.Table.from_pydict(columns, schema=schema))

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every command that reads a params file: one per DVC stage (the CLI's own table), and `validate`.
from pipeline.cli import PER_BLOCK_STAGES, STAGE_SECTIONS  # noqa: E402

STAGE_COMMANDS = [name.replace("_", "-") + (" 1" if name in PER_BLOCK_STAGES else "") for name in STAGE_SECTIONS]
"""Command lines (split on spaces): a per-block stage's with a block."""
PARAMS_COMMANDS = [*STAGE_COMMANDS, "validate"]

TINY_SHAPE: dict[str, int] = dict(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=4)
"""The shape of the tiny ViTs the model-level tests build (`ModelParams(**TINY_SHAPE)`)."""


def steer_details(strategies: list[str], with_headline: bool, acc_ci: tuple[float, float] = (-0.01, 0.02)) -> dict:
    """metrics/details/steer.json as the steer stage writes it, with hand-made numbers
    (tests/test_report.py, tests/test_pruned.py)."""
    metrics = {
        "baseline": {"accuracy": 0.372, "head_usage": 0.561},
        "strategies": {s: {"alpha": [-1.0, 0.0, 4.0], "accuracy": [0.36, 0.372, 0.37], "head_usage": [0.6, 0.561, 0.5],
                           "accuracy_range": [[0.36, 0.36], [0.372, 0.372], [0.37, 0.37]],
                           "head_usage_range": [[0.6, 0.6], [0.561, 0.561], [0.5, 0.5]],
                           "accuracy_ci": [[0.35, 0.37], [0.36, 0.38], [0.36, 0.38]],
                           "head_usage_ci": [[0.59, 0.61], [0.55, 0.57], [0.49, 0.51]]} for s in strategies},
        "flops": {"gflops_dense": 0.08, "gflops_unsteered": 0.05, "final_block_attention_gflops_dense": 0.004},
        "settings": {"mode": "scale", "keep_error": True, "accuracy_tolerance": 0.0, "select_on": "val", "bootstrap": 1000,
                     "confidence": 0.95, "null_draws": 20, "head_index_base": 0, "images": {"val": 150, "test": 300},
                     "variants": 10, "head_path": "masked"},
    }
    if with_headline:
        metrics["per_class_headline"] = {
            "mean_usage_reduction": 0.054, "mean_usage_change": -0.054, "mean_usage_change_ci": [-0.07, -0.04],
            "mean_accuracy_change": 0.005, "mean_accuracy_change_ci": list(acc_ci), "classes_with_reduction": 2,
            "classes_with_reduction_ci_below_zero": 1, "alpha_counts": {"negative": 0, "zero": 1, "positive": 2},
            "alpha": {}, "usage_change": {}, "mean_gflops_change": -0.001, "selected_on": "val", "top": [],
            "null": {"classes_below": 1, "classes_above": 0, "classes": 3, "per_alpha": {}},
        }
        metrics["predicted_class_policy"] = {
            "mean_usage_change": -0.03, "mean_usage_change_ci": [-0.05, -0.01], "mean_accuracy_change": -0.01,
            "mean_accuracy_change_ci": [-0.03, 0.01], "classes_with_reduction": 1, "classes_with_reduction_ci_below_zero": 0,
            "alpha": {},
        }
    return metrics


# The smallest parameters that still exercise every stage: 4 synthetic classes of 16x16
# images, a 2-block ViT of width 24 with 3 heads, one epoch of everything.
TINY_PARAMS: dict[str, Any] = {
    "data": {
        "source": "synthetic",
        "seed": 0,
        "val_per_class": 4,
        "synthetic": {"num_classes": 4, "train_per_class": 16, "test_per_class": 8, "image_size": 16, "noise": 0.05},
    },
    "model": {
        "name": "vit_small_patch16_224",
        "img_size": 16,
        "patch_size": 4,
        "embed_dim": 24,
        "depth": 2,
        "num_heads": 3,
        "keep_layers": 1,
    },
    # a strong usage loss for a few epochs, so that the gates are mixed and steering moves them
    # (one epoch at the defaults keeps every head for every variant: a steering test could not fail)
    "finetune": {"epochs": 6, "batch_size": 16, "warmup_epochs": 0.0, "lr": 0.01, "head_weight": 10.0, "device": "cpu"},
    "extract": {"batch_size": 32, "device": "cpu"},
    "sae": {"expansion": 2, "k": 4, "epochs": 2, "batch_size": 16, "warmup_steps": 1, "device": "cpu"},
    "stats": {"top_k": 4, "related": 2},
    "interpret": {"top_n": 4, "grid_latents": 3, "grid_images": 3, "card_latents": 2},
    "steer": {"alphas": [-1.0, 0.0, 1.0], "null_draws": 3, "bootstrap": 50, "batch_size": 32, "top_classes": 2, "device": "cpu"},
    "ceiling": {"batch_size": 32, "device": "cpu"},
    "latency": {"images": 16, "batch_sizes": [1, 8], "rounds": 1},
}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture
def tiny_params_dict() -> Callable[..., dict[str, Any]]:
    """Factory: `tiny_params_dict(data={"seed": 1})` -> the tiny params as a plain dict (for
    writing a params.yaml), sections deep-merged with the overrides."""
    return lambda **sections: _merge(TINY_PARAMS, sections)


@pytest.fixture
def tiny_params() -> Callable[..., Params]:
    """Factory: `tiny_params(data={"synthetic": {"num_classes": 3}})` -> a validated Params."""
    return lambda **sections: parse_params(_merge(TINY_PARAMS, sections), "tiny params")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with params.yaml (TINY_PARAMS) and every stage's outputs, each stage run
    in-process in order, once per session. Tests only read it; one that changes a file works
    on a copy (tests/test_reliability.py, tests/test_explorer.py)."""
    return run_every_stage(tmp_path_factory.mktemp("tiny-run"), TINY_PARAMS)


def run_every_stage(root: Path, raw: dict[str, Any]) -> Path:
    """Write `raw` as root/params.yaml and run every stage in-process inside `root`."""
    import yaml

    from pipeline.cli import call_stages

    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    old = Path.cwd()
    os.chdir(root)
    try:
        call_stages(parse_params(raw, "params"))
    finally:
        os.chdir(old)
    return root


@pytest.fixture
def one_thread() -> Iterator[int]:
    """Torch on one thread for tiny tensors: a second thread only adds synchronisation (and, on a
    shared 2-core machine, long waits). Yields the previous count and restores it afterwards.
    Files of small-tensor tests use it for every test (`pytestmark`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield threads
    torch.set_num_threads(threads)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test inside an empty temporary directory (stages write relative to the CWD)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _is_local(address: Any) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail fast and clearly if a test tries to reach another machine (loopback is allowed)."""
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        if not _is_local(address):
            raise OSError(f"tests must not use the network (attempted connection to {address!r})")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


# ------------------------------------------------------------------------ reliability summary
# tests/test_reliability.py counts what it actually executes: every hypothesis example (through
# `reliability_case`) and every scenario test (through the hook below). The run ends with one
# line, `reliability: N cases tried, F failures`.
RELIABILITY = {"cases": 0, "failures": 0}
_RELIABILITY_FILE = "test_reliability.py"


@contextlib.contextmanager
def reliability_case() -> Iterator[None]:
    """Count one reliability case; an exception (a failed check) counts as a failure."""
    RELIABILITY["cases"] += 1
    try:
        yield
    except pytest.skip.Exception:
        RELIABILITY["cases"] -= 1  # a skipped case was not tried
        raise
    except BaseException:
        RELIABILITY["failures"] += 1
        raise


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Any:
    # A hypothesis test counts its examples itself; any other test of the file is one case.
    if pyfuncitem.path.name != _RELIABILITY_FILE or getattr(pyfuncitem.obj, "is_hypothesis_test", False):
        return (yield)
    with reliability_case():
        return (yield)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # Tests whose fixtures failed never ran a case, but they are failures of the suite all the same.
    errors = sum(_RELIABILITY_FILE in getattr(r, "nodeid", "") for r in terminalreporter.stats.get("error", []))
    if RELIABILITY["cases"] or errors:
        failures = RELIABILITY["failures"] + errors
        terminalreporter.write_line(f"reliability: {RELIABILITY['cases']} cases tried, {failures} failures")
