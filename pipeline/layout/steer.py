"""`steer` writes the steering results, their figures and the run's report."""

from pathlib import Path

from pipeline.layout import download, extract, finetune, interpret, latent_stats, train_sae

RESULTS_DIR = Path("data/steer")
RESULTS = RESULTS_DIR / "results.parquet"
METRICS = Path("metrics/steer.json")
"""Headline numbers only: the per-class steering headline (mean usage reduction, mean accuracy
change, classes that use fewer heads)."""
DETAILS = Path("metrics/details/steer.json")
"""Baseline, every strategy's curve, settings, the headline's top classes."""
REPORT = Path("metrics/report.md")
ACCURACY = Path("metrics/plots/steer_accuracy.json")
USAGE = Path("metrics/plots/steer_usage.json")
CLASS_USAGE = Path("metrics/plots/steer_class_usage.json")
CURVES_PNG = Path("metrics/plots/steer_curves.png")
HEAD_KEEP_HEATMAP = Path("metrics/plots/head_keep_heatmap.png")
CLASS_USAGE_PNG = Path("metrics/plots/steer_class_usage.png")
CLASS_CARDS = Path("metrics/plots/class_cards.png")
"""The featured classes' top latents, each with its most activating training images."""
ATTRIBUTION_HEATMAP = Path("metrics/plots/attribution_heatmap.png")
SHIFT_SCATTER = Path("metrics/plots/shift_vs_keep.png")
"""Predicted gate-logit shift (interpret) against measured keep-rate change, per head."""

READS = (
    download.DATASET, extract.EMBEDDINGS, latent_stats.STATS, finetune.MODEL, train_sae.SAE,
    latent_stats.DETAILS, finetune.DETAILS, train_sae.DETAILS, interpret.INTERPRET, interpret.DETAILS,
)
WRITES = (RESULTS_DIR, REPORT, METRICS, DETAILS, ACCURACY, USAGE, CLASS_USAGE, HEAD_KEEP_HEATMAP, CURVES_PNG, CLASS_USAGE_PNG,
          CLASS_CARDS, ATTRIBUTION_HEATMAP, SHIFT_SCATTER)
