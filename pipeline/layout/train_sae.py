"""`train_sae` writes the SAE (pipeline.sae) and its training record."""

from pathlib import Path

from pipeline.layout import extract

SAE = Path("models/sae")
"""model.safetensors + config.json."""
SAE_CONFIG = SAE / "config.json"
METRICS = Path("metrics/sae.json")
CURVES = Path("metrics/plots/sae_train.json")

READS = (extract.EMBEDDINGS,)
WRITES = (SAE, METRICS, CURVES)
