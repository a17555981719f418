"""`finetune`: train the head-gated ViT on data/dataset; write models/vit and its metrics.

Runs as one process or under torchrun (DistributedDataParallel); only rank 0 writes. The
per-epoch curves (accuracy and usage, loss, GFLOPs, usage of every gated block) and the headline
are logged with DVCLive after every epoch (pipeline.report.live): `dvc exp show` lists a running
experiment's epoch, accuracy and usage, and the figures `dvc.yaml` defines draw the TSVs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.data.dataset import load_images
from pipeline.layout import download
from pipeline.layout import finetune as files
from pipeline.model.fast_training import train_resident
from pipeline.model.flops import FlopModel, flop_model
from pipeline.model.gated_vit import build_gated_vit, model_config, save_gated_vit
from pipeline.model.record import TrainingRecord, write_record
from pipeline.model.training import evaluate, train
from pipeline.params.finetune import FinetuneParams
from pipeline.params.model import ModelParams
from pipeline.report.live import EpochLog
from pipeline.runtime import device_and_distributed, finish_distributed, seed_everything
from pipeline.storage import clean_outputs

log = logging.getLogger(__name__)


def epoch_logger(log_dir: EpochLog, flops: FlopModel, keep_layers: int) -> Callable[[dict[str, Any]], None]:
    """What `train` calls after every epoch: the curves (train loss and accuracy, test accuracy,
    final-block head usage, GFLOPs per image, the usage of every gated block) and the headline
    as it stands, for `dvc exp show` while the run trains."""

    def on_epoch(row: dict[str, Any]) -> None:
        usage = row["head_usage_per_block"]
        gflops = flops.from_usage(usage) / 1e9
        log_dir.epoch(
            row["epoch"],
            curves={key: row[key] for key in ("train_loss", "train_accuracy", "test_accuracy", "head_usage")} | {"gflops": gflops},
            headline={"test_accuracy": row["test_accuracy"], "head_usage": row["head_usage"], "gflops": gflops},
            tables={"head_usage_per_block": {f"block {b}": usage[b] for b in range(keep_layers, len(usage))}},
        )

    return on_epoch


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
    flops = flop_model(model)
    epoch_log = EpochLog(files.LOG) if dist_info.is_main else None
    start = time.perf_counter()
    loop = train_resident if fp.loop == "resident" else train  # resident: the GPU path (params docstring)
    loop(
        model, train_set.images, train_set.labels, test_set.images, test_set.labels, config, fp, device, dist_info,
        checkpoint=files.CHECKPOINT, on_epoch=epoch_logger(epoch_log, flops, config.keep_layers) if epoch_log else None,
    )
    elapsed = time.perf_counter() - start
    if dist_info.is_main:
        seen = len(train_set.labels) * fp.epochs
        log.info("trained in %.1f s (%.0f images/s)", elapsed, seen / elapsed)
        final = evaluate(model, test_set.images, test_set.labels, config, device, batch_size=256)
        save_gated_vit(files.MODEL, model.cpu(), config)
        gflops = flops.from_usage(final.head_usage_per_block) / 1e9
        assert epoch_log is not None
        epoch_log.finish({"test_accuracy": final.accuracy, "head_usage": final.head_usage, "gflops": gflops})
        write_record(files.DETAILS, TrainingRecord(
            **final.summary(), epochs=fp.epochs, num_classes=len(class_names),
            # matmul GFLOPs per test image from the gates (pipeline.model.flops), and what the masked
            # path computes for every image (all heads)
            gflops=gflops, gflops_dense=flops.dense / 1e9, gflops_fraction=gflops * 1e9 / flops.dense,
            gflops_per_head=[c / 1e9 for c in flops.per_head], gflops_fixed=flops.fixed / 1e9,
        ))
        log.info("test accuracy %.4f, final-block head usage %.3f", final.accuracy, final.head_usage)
    finish_distributed(dist_info)
