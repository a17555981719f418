"""`finetune` writes the gated ViT (pipeline.model.gated_vit) and its training record."""

from pathlib import Path

from pipeline.layout import download

MODEL = Path("models/vit")
"""model.safetensors + config.json."""
MODEL_CONFIG = MODEL / "config.json"
METRICS = Path("metrics/finetune.json")
"""Headline numbers only (what `dvc exp show` lists): test accuracy, final-block head usage."""
DETAILS = Path("metrics/details/finetune.json")
"""Everything else about the trained model: usage per block and per head, epochs, classes."""
ACCURACY_CURVES = Path("metrics/plots/finetune_accuracy.json")
LOSS_CURVE = Path("metrics/plots/finetune_loss.json")
BLOCK_USAGE_CURVES = Path("metrics/plots/finetune_block_usage.json")
CHECKPOINT = Path("models/vit_ckpt/last.pt")
"""The per-epoch resume checkpoint: private scratch (git-ignored), deliberately not a DVC output."""

READS = (download.DATASET,)
WRITES = (MODEL, METRICS, DETAILS, ACCURACY_CURVES, LOSS_CURVE, BLOCK_USAGE_CURVES)
