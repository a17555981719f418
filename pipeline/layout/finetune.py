"""`finetune` writes the gated ViT (pipeline.model.gated_vit) and its training record."""

from pathlib import Path

from pipeline.layout import download

MODEL = Path("models/vit")
"""model.safetensors + config.json."""
MODEL_CONFIG = MODEL / "config.json"
LOG = Path("metrics/finetune")
"""The per-epoch DVCLive log (pipeline.report.live): its summary and its curves."""
METRICS = LOG / "metrics.json"
"""Headline numbers only (what `dvc exp show` lists): test accuracy, final-block head usage,
GFLOPs per image; rewritten after every epoch while training runs, then from the final model."""
CURVES = LOG / "plots"
"""One TSV per epoch-level scalar (train loss and accuracy, test accuracy, head usage, GFLOPs)
and the head usage of every gated block (custom/head_usage_per_block.json)."""
DETAILS = Path("metrics/details/finetune.json")
"""Everything else about the trained model: usage per block and per head, epochs, classes."""
CHECKPOINT = Path("models/vit_ckpt/last.pt")
"""The per-epoch resume checkpoint: private scratch (git-ignored), deliberately not a DVC output."""

READS = (download.DATASET,)
WRITES = (MODEL, METRICS, DETAILS, CURVES)
