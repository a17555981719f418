"""`train_sae`: the SAE on the final block's CLS input (docs/METHOD.md, section 3).

Reads data/embeddings/{train,test}.parquet. Writes:
- models/sae/: safetensors weights plus config.json (the SAE's architecture, shape and input
  scale, the `sae` params, the embeddings' model_hash and layer);
- metrics/sae/: the DVCLive log (pipeline.report.live): metrics.json, the headline (test FVU, L0,
  dead fraction; the test FVU after each epoch while training runs), and plots/metrics/*.tsv, one
  curve per epoch-level scalar;
- metrics/details/sae.json: mse, fvu, l0, dead_fraction for train and test, the run's shape and
  the per-epoch history.

Throughput is logged, not written: the outputs stay byte-identical from run to run on the CPU.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pipeline.checks import same_width
from pipeline.data.embeddings import read_embeddings
from pipeline.layout import extract
from pipeline.layout import train_sae as files
from pipeline.params.sae import SaeParams
from pipeline.report.live import EpochLog
from pipeline.runtime import pick_device
from pipeline.sae.registry import save_sae
from pipeline.sae.training import evaluate_sae, resolve_n_latents, train_sae
from pipeline.storage import clean_outputs, rounded, write_json

log = logging.getLogger(__name__)

CURVE_KEYS = ("epoch", "loss", "aux_loss", "train_fvu", "test_fvu", "l0", "dead_fraction")
LOGGED = {"loss": "loss", "aux_loss": "aux_loss", "train_fvu": "train_fvu", "test_fvu": "test_fvu",
          "l0": "train_l0", "dead_fraction": "train_dead_fraction"}
"""History key -> the DVCLive curve's name: L0 and the dead fraction of an epoch are measured on
the training batches, named so beside the headline's test-split `l0` and `dead_fraction`."""
LOG_EVERY = 10  # epochs between progress lines in the log


def run(cfg: SaeParams) -> None:
    fit(cfg, files.FINAL)


def fit(cfg: SaeParams, out: files.SaeFiles, block: int | None = None) -> None:
    """Train an SAE on the CLS inputs of `block` (None: the final block) and write it to `out`."""
    clean_outputs(*out.writes)
    train_path, test_path = extract.embeddings_split("train"), extract.embeddings_split("test")
    train, test = read_embeddings(train_path, block), read_embeddings(test_path, block)
    same_width(test.dim, test_path, train.dim, train_path, rerun="extract")
    n_latents = resolve_n_latents(cfg, train.dim)  # ParamsError (exit 2) before any work
    device = pick_device(cfg.device)
    log.info("training a %s SAE %d -> %d (k %d) on %d embeddings of block %s for %d epochs on %s",
             cfg.architecture, train.dim, n_latents, cfg.k, train.x.shape[0], train.meta["layer"] if block is None else block,
             cfg.epochs, device)
    if cfg.architecture == "frozen_random":
        log.info("frozen_random: the weights stay at their random initialisation (the epochs only record the objective)")

    epoch_log = EpochLog(out.log)

    def report(row: dict[str, Any]) -> None:
        epoch_log.epoch(row["epoch"], curves={name: row[key] for key, name in LOGGED.items()}, headline={"fvu": row["test_fvu"]})
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
    save_sae(out.sae, sae, {
        "params": cfg.model_dump(mode="json"),
        "model_hash": train.meta.get("model_hash"),
        "layer": train.meta.get("layer") if block is None else block,
    })
    on_train, on_test = evaluate_sae(sae, train.x), evaluate_sae(sae, test.x)
    log.info("train FVU %.4f, test FVU %.4f, test L0 %.1f, dead fraction %.3f",
             on_train["fvu"], on_test["fvu"], on_test["l0"], on_test["dead_fraction"])
    # the headline, on the test split; short names keep `dvc exp show` legible at 120 columns
    epoch_log.finish({key: on_test[key] for key in ("fvu", "l0", "dead_fraction")})
    details = {
        "train": rounded(on_train),
        "test": rounded(on_test),
        "dim": sae.dim,
        "n_latents": sae.n_latents,
        "architecture": sae.ARCHITECTURE,
        "k": getattr(sae, "k", None),
        "epochs": cfg.epochs,
        "input_scale": rounded(sae.input_scale),
        "n_train": int(train.x.shape[0]),
        "n_test": int(test.x.shape[0]),
        "history": [rounded({key: row[key] for key in CURVE_KEYS}) for row in history],
    }
    write_json(out.details, details)
