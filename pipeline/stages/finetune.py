"""`finetune`: train the head-gated ViT on data/dataset; write models/vit and its metrics.

Runs as one process or under torchrun (DistributedDataParallel); only rank 0 writes.
Per-epoch curves go through DVCLive (metrics/finetune/), replayed from the run's history once
training is complete so that the directory appears whole and without timestamps.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist

from pipeline.data import load_images
from pipeline.gated_vit import build_gated_vit, model_config, save_gated_vit
from pipeline.io import atomic_path, clean_outputs, seed_everything, write_json
from pipeline.params import Params
from pipeline.training import device_and_distributed, evaluate, train

log = logging.getLogger(__name__)

DATASET = Path("data/dataset")
MODEL_DIR = Path("models/vit")
CHECKPOINT = Path("models/vit_ckpt/last.pt")
METRICS = Path("metrics/finetune.json")
LIVE_DIR = Path("metrics/finetune")


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
    clean_outputs(MODEL_DIR, METRICS, LIVE_DIR, CHECKPOINT)  # CHECKPOINT: a killed run's temporary

    train_set = load_images(DATASET / "train.parquet", num_workers=fp.num_workers)
    test_set = load_images(DATASET / "test.parquet", num_workers=fp.num_workers)
    class_names = train_set.class_names

    seed_everything(fp.seed)  # identical initialisation on every rank
    model = build_gated_vit(params.model, num_classes=len(class_names), tau=fp.tau)
    config = model_config(params.model, model.vit, len(class_names), class_names, fp.tau)
    log.info(
        "training %s %s on %d images (%d classes), %d process(es), device %s",
        params.model.name, config["shape"], len(train_set.labels), len(class_names), dist_info.world, device,
    )
    CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    history = train(
        model, train_set.images, train_set.labels, test_set.images, test_set.labels,
        config, fp, device, dist_info, checkpoint=CHECKPOINT,
    )
    elapsed = time.perf_counter() - start
    if dist_info.is_main:
        seen = len(train_set.labels) * fp.epochs
        log.info("trained in %.1f s (%.0f images/s)", elapsed, seen / elapsed)
        final = evaluate(model, test_set.images, test_set.labels, config, device, batch_size=256)
        save_gated_vit(MODEL_DIR, model.cpu(), config)
        write_curves(history, LIVE_DIR)
        write_json(METRICS, {**final.summary(), "epochs": fp.epochs, "num_classes": len(class_names)})
        log.info("test accuracy %.4f, final-block head usage %.3f", final.accuracy, final.head_usage)
    if dist_info.world > 1:
        dist.barrier()
        dist.destroy_process_group()
