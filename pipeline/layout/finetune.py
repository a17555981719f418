"""`finetune` writes the gated ViT (pipeline.gated_vit) and its training record."""

from pathlib import Path

from pipeline.layout import download

MODEL = Path("models/vit")
"""model.safetensors + config.json."""
MODEL_CONFIG = MODEL / "config.json"
METRICS = Path("metrics/finetune.json")
CURVES = Path("metrics/finetune")
"""DVCLive's directory: per-epoch curves under plots/metrics/."""
CHECKPOINT = Path("models/vit_ckpt/last.pt")
"""The per-epoch resume checkpoint: private scratch (git-ignored), deliberately not a DVC output."""

READS = (download.DATASET,)
WRITES = (MODEL, METRICS, CURVES)
