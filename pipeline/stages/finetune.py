"""`finetune`: train the head-gated ViT on data/dataset; write models/vit and its metrics.

Runs as one process or under torchrun (DistributedDataParallel); only rank 0 writes.
Per-epoch curves go through DVCLive (metrics/finetune/), replayed from the run's history once
training is complete so that the directory appears whole and without timestamps.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.dataset import load_images
from pipeline.gated_vit import build_gated_vit, model_config, save_gated_vit
from pipeline.layout import download
from pipeline.layout import finetune as files
from pipeline.params import Params
from pipeline.runtime import device_and_distributed, finish_distributed, seed_everything
from pipeline.storage import atomic_path, clean_outputs, write_json
from pipeline.training import evaluate, train

log = logging.getLogger(__name__)


def write_curves(history: list[dict[str, float]], directory: Path) -> None:
    """Per-epoch curves in DVCLive's layout (plots/metrics/<name>.tsv), written atomically."""
    from dvclive import Live

    with atomic_path(directory, directory=True) as tmp:
        live = Live(dir=str(tmp), save_dvc_exp=False, dvcyaml=None, report=None)
        for row in history:
            for key, value in row.items():
                if key != "epoch":
                    live.log_metric(key, value)
            live.next_step()
        live.end()


def run(params: Params) -> None:
    fp = params.finetune
    device, dist_info = device_and_distributed(fp.device)
    clean_outputs(*files.WRITES, files.CHECKPOINT)  # the checkpoint: a killed run's temporary

    train_set = load_images(download.dataset_split("train"), num_workers=fp.num_workers)
    test_set = load_images(download.dataset_split("test"), num_workers=fp.num_workers)
    class_names = train_set.class_names

    seed_everything(fp.seed)  # identical initialisation on every rank
    model = build_gated_vit(params.model, num_classes=len(class_names), tau=fp.tau)
    config = model_config(params.model, model.vit, len(class_names), class_names, fp.tau)
    log.info(
        "training %s %s on %d images (%d classes), %d process(es), device %s",
        params.model.name, config.shape, len(train_set.labels), len(class_names), dist_info.world, device,
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
        write_curves(history, files.CURVES)
        write_json(files.METRICS, {**final.summary(), "epochs": fp.epochs, "num_classes": len(class_names)})
        log.info("test accuracy %.4f, final-block head usage %.3f", final.accuracy, final.head_usage)
    finish_distributed(dist_info)
