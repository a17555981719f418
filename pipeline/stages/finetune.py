"""`finetune`: train the head-gated ViT on data/dataset; write models/vit and its metrics.

Runs as one process or under torchrun (DistributedDataParallel); only rank 0 writes. The
per-epoch curves (accuracy and usage, loss, usage of every gated block) are written once
training is complete, as long tables for the figures `dvc.yaml` defines.
"""

from __future__ import annotations

import logging
import time

from pipeline.data.dataset import load_images
from pipeline.layout import download
from pipeline.layout import finetune as files
from pipeline.model.flops import flop_model
from pipeline.model.gated_vit import build_gated_vit, model_config, save_gated_vit
from pipeline.model.record import TrainingRecord, write_record
from pipeline.model.training import evaluate, train
from pipeline.params.finetune import FinetuneParams
from pipeline.params.model import ModelParams
from pipeline.report.plot_data import series_rows
from pipeline.runtime import device_and_distributed, finish_distributed, seed_everything
from pipeline.storage import clean_outputs, rounded, write_json

log = logging.getLogger(__name__)


def write_curves(history: list[dict], keep_layers: int) -> None:
    """The per-epoch figures' data: accuracy and usage (one axis: fractions), loss, and the
    head usage of every gated block."""
    epochs = [row["epoch"] for row in history]
    write_json(files.ACCURACY_CURVES, series_rows("epoch", epochs, {
        "train accuracy": [row["train_accuracy"] for row in history],
        "test accuracy": [row["test_accuracy"] for row in history],
        "final-block head usage": [row["head_usage"] for row in history],
    }))
    write_json(files.LOSS_CURVE, series_rows("epoch", epochs, {"train loss": [row["train_loss"] for row in history]}))
    depth = len(history[0]["head_usage_per_block"])
    write_json(files.BLOCK_USAGE_CURVES, series_rows("epoch", epochs, {
        f"block {b}": [row["head_usage_per_block"][b] for row in history] for b in range(keep_layers, depth)
    }, y_name="head_usage"))


def run(mp: ModelParams, fp: FinetuneParams) -> None:
    device, dist_info = device_and_distributed(fp.device)
    clean_outputs(*files.WRITES, files.CHECKPOINT)  # the checkpoint: a killed run's temporary

    train_set = load_images(download.dataset_split("train"), num_workers=fp.num_workers)
    test_set = load_images(download.dataset_split("test"), num_workers=fp.num_workers)
    class_names = train_set.class_names

    seed_everything(fp.seed)  # identical initialisation on every rank
    model = build_gated_vit(mp, num_classes=len(class_names), tau=fp.tau)
    config = model_config(mp, model.vit, len(class_names), class_names, fp.tau)
    log.info(
        "training %s %s on %d images (%d classes), %d process(es), device %s",
        mp.name, config.shape, len(train_set.labels), len(class_names), dist_info.world, device,
    )
    files.CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    history = train(
        model, train_set.images, train_set.labels, test_set.images, test_set.labels,
        config, fp, device, dist_info, checkpoint=files.CHECKPOINT,
    )
    elapsed = time.perf_counter() - start
    if dist_info.is_main:
        seen = len(train_set.labels) * fp.epochs
        log.info("trained in %.1f s (%.0f images/s)", elapsed, seen / elapsed)
        final = evaluate(model, test_set.images, test_set.labels, config, device, batch_size=256)
        save_gated_vit(files.MODEL, model.cpu(), config)
        write_curves(history, config.keep_layers)
        flops = flop_model(model)
        gflops = flops.from_usage(final.head_usage_per_block) / 1e9
        write_json(files.METRICS, rounded({"test_accuracy": final.accuracy, "head_usage": final.head_usage, "gflops": gflops}))
        write_record(files.DETAILS, TrainingRecord(
            **final.summary(), epochs=fp.epochs, num_classes=len(class_names),
            # matmul GFLOPs per test image from the gates (pipeline.model.flops), and what the masked
            # path computes for every image (all heads)
            gflops=gflops, gflops_dense=flops.dense / 1e9, gflops_fraction=gflops * 1e9 / flops.dense,
            gflops_per_head=[c / 1e9 for c in flops.per_head], gflops_fixed=flops.fixed / 1e9,
        ))
        log.info("test accuracy %.4f, final-block head usage %.3f", final.accuracy, final.head_usage)
    finish_distributed(dist_info)
