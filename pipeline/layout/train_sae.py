"""`train_sae` writes the SAE (pipeline.sae) and its training record."""

from pathlib import Path

from pipeline.layout import extract

SAE = Path("models/sae")
"""model.safetensors + config.json."""
SAE_CONFIG = SAE / "config.json"
METRICS = Path("metrics/sae.json")
"""Headline numbers only: FVU, L0 and dead fraction on the test split."""
DETAILS = Path("metrics/details/sae.json")
"""Both splits' MSE, FVU, L0 and dead fraction; the SAE's shape; the per-epoch history."""
FVU_CURVES = Path("metrics/plots/sae_fvu.json")
DEAD_CURVE = Path("metrics/plots/sae_dead.json")

READS = (extract.EMBEDDINGS,)
WRITES = (SAE, METRICS, DETAILS, FVU_CURVES, DEAD_CURVE)
