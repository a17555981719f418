"""`interpret` writes what each latent responds to and which final-block heads it moves."""

from pathlib import Path

from pipeline.layout import download, extract, finetune, latent_stats, train_sae

INTERPRET = Path("data/interpret")
GALLERIES = INTERPRET / "galleries.parquet"
"""Top-N training images per latent: latent, rank, row (in the train split), index, label, activation."""
LATENTS = INTERPRET / "latents.parquet"
"""One row per latent: firing rate, label, purity, entropy, gate-logit attribution per head."""
SHIFTS = INTERPRET / "shifts.parquet"
"""Predicted mean gate-logit shift per head at alpha = 1, per (strategy, class), test split."""
METRICS = Path("metrics/interpret.json")
"""Headline number only: the mean class purity of the SAE's alive latents."""
DETAILS = Path("metrics/details/interpret.json")
"""Purity of SAE latents against random and PCA directions, attribution summary, timings."""
LATENT_GRID = Path("metrics/plots/latent_grid.png")
PURITY_PLOT = Path("metrics/plots/purity.png")

READS = (download.DATASET, extract.EMBEDDINGS, train_sae.SAE, latent_stats.STATS, finetune.MODEL)
WRITES = (INTERPRET, METRICS, DETAILS, LATENT_GRID, PURITY_PLOT)
