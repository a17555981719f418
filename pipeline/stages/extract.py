"""`extract`: the final block's CLS input and gate decisions of every image, into Parquet."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.data import load_images
from pipeline.embeddings import read_embeddings
from pipeline.extraction import extract_split, weights_hash
from pipeline.gated_vit import load_gated_vit
from pipeline.io import PipelineError, atomic_path, clean_outputs, pick_device, read_json, write_json
from pipeline.params import ParamsError, Params

log = logging.getLogger(__name__)

DATASET = Path("data/dataset")
MODEL_DIR = Path("models/vit")
FINETUNE_METRICS = Path("metrics/finetune.json")
OUT_DIR = Path("data/embeddings")
METRICS = Path("metrics/extract.json")
SPLITS = ("train", "test")


def run(params: Params) -> None:
    ep = params.extract
    clean_outputs(OUT_DIR, METRICS)
    model, config = load_gated_vit(MODEL_DIR)
    bad = [i for i in ep.layers if i >= model.depth]
    if bad:
        raise ParamsError(f"extract.layers = {ep.layers}: blocks {bad} do not exist (the model has {model.depth})")
    extra = tuple(sorted(set(ep.layers) - {model.depth - 1}))
    device = pick_device(ep.device)
    model_hash = weights_hash(MODEL_DIR)

    with atomic_path(OUT_DIR, directory=True) as tmp:
        for split in SPLITS:
            images = load_images(DATASET / f"{split}.parquet")
            if images.class_names != config["class_names"]:
                raise PipelineError(f"{DATASET / split}.parquet: class names differ from the model's ({MODEL_DIR}/config.json)")
            meta = {
                "model_hash": model_hash,
                "layer": model.depth - 1,
                "dim": model.vit.embed_dim,
                "num_heads": model.num_heads,
                "class_names": config["class_names"],
                "split": split,
                "extra_layers": list(extra),
            }
            extract_split(model, images.images, images.labels, images.index, config, tmp / f"{split}.parquet", meta, ep.batch_size, device, extra)
            log.info("extracted %d %s rows", len(images.labels), split)

    # Recompute the headline numbers from the stored rows: they must agree with finetune's.
    tables = {split: read_embeddings(OUT_DIR / f"{split}.parquet") for split in SPLITS}
    test = tables["test"]
    finetune = read_json(FINETUNE_METRICS)
    consistent = abs(test.accuracy - finetune["test_accuracy"]) < 1e-9 and abs(test.head_usage - finetune["head_usage"]) < 1e-9
    if not consistent:
        log.warning(
            "stored rows give accuracy %.6f / usage %.6f, finetune reported %.6f / %.6f",
            test.accuracy, test.head_usage, finetune["test_accuracy"], finetune["head_usage"],
        )
    write_json(
        METRICS,
        {
            "rows": {split: int(t.x.shape[0]) for split, t in tables.items()},
            "dim": test.dim,
            "num_heads": int(test.gates.shape[1]),
            "layer": test.meta["layer"],
            "model_hash": model_hash,
            "test_accuracy": test.accuracy,
            "head_usage": test.head_usage,
            "train_accuracy": tables["train"].accuracy,
            "consistent_with_finetune": consistent,
        },
    )
