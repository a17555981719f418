"""`steer` writes the steering results (pipeline.steering.results) and the data of its `dvc plots`."""

from pathlib import Path

from pipeline.layout import download, extract, finetune, latent_stats, latent_stats_block, train_sae, train_sae_block

RESULTS_DIR = Path("data/steer")
RESULTS = RESULTS_DIR / "results.parquet"
"""One row per (split, strategy, alpha, draw, class): accuracy, head usage, keep rate per head."""
HEADLINE = RESULTS_DIR / "headline.parquet"
"""One row per class: the alpha chosen on the selection split and its test-split outcome."""
BLOCKS = RESULTS_DIR / "blocks.parquet"
"""Multi-block steering only (`steer.blocks` other than `final`): results.parquet's rows per
gated block, that block's own usage and keep rates (`results.write_block_rows`)."""
DIRECTIONS = RESULTS_DIR / "directions.safetensors"
"""The controls' unit directions (`pipeline.steering.controls.write_directions`)."""
METRICS = Path("metrics/steer.json")
"""Headline numbers only: the per-class steering headline (mean usage reduction, mean accuracy
change, classes that use fewer heads)."""
DETAILS = Path("metrics/details/steer.json")
"""Baseline, every strategy's curve, settings, the headline's summary and nulls."""
ACCURACY = Path("metrics/plots/steer_accuracy.json")
USAGE = Path("metrics/plots/steer_usage.json")
CLASS_USAGE = Path("metrics/plots/steer_class_usage.json")

READS = (download.DATASET, extract.EMBEDDINGS, latent_stats.STATS, finetune.MODEL, train_sae.SAE, finetune.DETAILS,
         train_sae_block.SAE_BLOCKS, latent_stats_block.STATS_BLOCKS)
WRITES = (RESULTS_DIR, METRICS, DETAILS, ACCURACY, USAGE, CLASS_USAGE)
