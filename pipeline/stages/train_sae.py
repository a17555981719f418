"""`train_sae`: the TopK SAE on the final block's CLS input (METHOD.md section 3).

Reads data/embeddings/{train,test}.parquet. Writes:
- models/sae/: safetensors weights plus config.json (the SAE's shape and input scale, the
  `sae` params, the embeddings' model_hash and layer);
- metrics/sae.json: mse, fvu, l0, dead_fraction for train and test, plus the run's shape;
- metrics/plots/sae_train.json: one row per epoch for `dvc plots`.

Throughput is logged, not written: the outputs stay byte-identical from run to run on the CPU.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from pipeline.embeddings import read_embeddings
from pipeline.io import PipelineError, clean_outputs, pick_device, write_json
from pipeline.params import Params
from pipeline.sae import evaluate_sae, resolve_n_latents, save_sae, train_sae

log = logging.getLogger(__name__)

TRAIN = Path("data/embeddings/train.parquet")
TEST = Path("data/embeddings/test.parquet")
SAE_DIR = Path("models/sae")
METRICS = Path("metrics/sae.json")
CURVES = Path("metrics/plots/sae_train.json")
CURVE_KEYS = ("epoch", "loss", "aux_loss", "train_fvu", "test_fvu", "l0", "dead_fraction")
LOG_EVERY = 10  # epochs between progress lines in the log
DIGITS = 6  # significant digits of the metrics


def run(params: Params) -> None:
    cfg = params.sae
    clean_outputs(SAE_DIR, METRICS, CURVES)
    train, test = read_embeddings(TRAIN), read_embeddings(TEST)
    if test.dim != train.dim:
        raise PipelineError(f"{TEST}: width {test.dim} differs from {TRAIN} ({train.dim}); rerun `extract`")
    n_latents = resolve_n_latents(cfg, train.dim)  # ParamsError (exit 2) before any work
    device = pick_device(cfg.device)
    log.info("training a TopK SAE %d -> %d (k %d) on %d embeddings for %d epochs on %s",
             train.dim, n_latents, cfg.k, train.x.shape[0], cfg.epochs, device)

    def report(row: dict[str, Any]) -> None:
        if row["epoch"] % LOG_EVERY == 0 or row["epoch"] == cfg.epochs:
            log.info("epoch %d: loss %.4f, train FVU %.4f, test FVU %.4f, dead %.3f, %.0f samples/s",
                     row["epoch"], row["loss"], row["train_fvu"], row["test_fvu"], row["dead_fraction"],
                     row["samples_per_s"])

    threads = cfg.threads if cfg.threads is not None and device.type == "cpu" else torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # restored afterwards: other stages run in the same process in tests and notebooks
        sae, history = train_sae(train.x, cfg, device, x_eval=test.x, on_epoch=report)
    finally:
        torch.set_num_threads(previous)
    speed = sum(r["samples_per_s"] for r in history) / len(history)
    log.info("mean training throughput %.0f samples/s", speed)

    sae = sae.to("cpu")
    save_sae(SAE_DIR, sae, {
        "params": cfg.model_dump(mode="json"),
        "model_hash": train.meta.get("model_hash"),
        "layer": train.meta.get("layer"),
    })
    on_train, on_test = evaluate_sae(sae, train.x), evaluate_sae(sae, test.x)
    log.info("train FVU %.4f, test FVU %.4f, test L0 %.1f, dead fraction %.3f",
             on_train["fvu"], on_test["fvu"], on_test["l0"], on_test["dead_fraction"])
    metrics = {
        "train": _json_floats(on_train),
        "test": _json_floats(on_test),
        "dim": sae.dim,
        "n_latents": sae.n_latents,
        "k": sae.k,
        "epochs": cfg.epochs,
        "input_scale": _round(sae.input_scale),
        "n_train": int(train.x.shape[0]),
        "n_test": int(test.x.shape[0]),
    }
    write_json(METRICS, metrics)
    write_json(CURVES, [_json_floats({key: row[key] for key in CURVE_KEYS}) for row in history])


def _json_floats(values: dict[str, Any]) -> dict[str, Any]:
    """Floats to 6 significant digits (readable JSON); JSON has no NaN, so an undefined value
    (e.g. the FVU of a constant split) becomes null."""
    return {k: (_round(v) if isinstance(v, float) else v) for k, v in values.items()}


def _round(value: float) -> float | None:
    return float(f"{value:.{DIGITS}g}") if math.isfinite(value) else None
