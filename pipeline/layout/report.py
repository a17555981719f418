"""`report` writes metrics/report.md and the figures it shows, from the outputs of `steer` and
`interpret` (and the other stages' details): a wording or figure change reruns `report` alone."""

from pathlib import Path

from pipeline.layout import ceiling, download, finetune, interpret, latency, latent_stats, steer, train_sae

REPORT = Path("metrics/report.md")
DETAILS = Path("metrics/details/report.json")
"""What the report computes from several stages' outputs: predicted (interpret) against measured
(steer) head shifts, and the global set's shift at the largest alpha."""
CURVES_PNG = Path("metrics/plots/steer_curves.png")
HEAD_KEEP_HEATMAP = Path("metrics/plots/head_keep_heatmap.png")
CLASS_USAGE_PNG = Path("metrics/plots/steer_class_usage.png")
CLASS_CARDS = Path("metrics/plots/class_cards.png")
"""The featured classes' top latents, each with its most activating training images."""
ATTRIBUTION_HEATMAP = Path("metrics/plots/attribution_heatmap.png")
SHIFT_SCATTER = Path("metrics/plots/shift_vs_keep.png")
"""Predicted gate-logit shift (interpret) against measured keep-rate change, per head."""
FRONTIER = Path("metrics/plots/ceiling_frontier.png")
"""Per featured class: every fixed pattern, the frontier, the ceiling's choice and steering."""

BLOCK_USAGE = Path("metrics/plots/block_usage.png")
"""Head usage per gated block: unsteered, at the per-class headline and at the ceiling."""

READS = (
    steer.RESULTS_DIR, steer.DETAILS, latency.DETAILS, ceiling.CEILING, ceiling.DETAILS, interpret.INTERPRET, interpret.DETAILS, latent_stats.STATS, latent_stats.DETAILS,
    finetune.MODEL, finetune.DETAILS, train_sae.DETAILS, download.DATASET,
)
WRITES = (REPORT, DETAILS, CURVES_PNG, HEAD_KEEP_HEATMAP, CLASS_USAGE_PNG, CLASS_CARDS, ATTRIBUTION_HEATMAP, SHIFT_SCATTER, FRONTIER,
          BLOCK_USAGE)
