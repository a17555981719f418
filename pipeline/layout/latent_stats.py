"""`latent_stats` writes which latents fire for which class, and the top sets steering uses."""

from dataclasses import dataclass
from pathlib import Path

from pipeline.layout import extract, train_sae

STATS = Path("data/stats")
LATENTS = STATS / "latents.parquet"
TOP_SETS = STATS / "top_sets.json"
METRICS = Path("metrics/latent_stats.json")
"""Headline numbers only: the global-vs-class top-set overlap, |A ∩ B| / K and Jaccard."""
DETAILS = Path("metrics/details/latent_stats.json")
"""Alive latents, L0, set sizes, test-split statistics, related classes."""
CLASS_OVERLAP = Path("metrics/plots/class_overlap.json")
OVERLAP_HEATMAP = Path("metrics/plots/overlap_heatmap.png")
FIRING_HISTOGRAM = Path("metrics/plots/firing_frequency.png")

READS = (extract.EMBEDDINGS, train_sae.SAE)
WRITES = (STATS, METRICS, DETAILS, CLASS_OVERLAP, OVERLAP_HEATMAP, FIRING_HISTOGRAM)


@dataclass(frozen=True)
class StatsFiles:
    """Where one SAE's statistics go: the final block's here, block b's in `latent_stats_block`."""

    stats: Path
    details: Path

    @property
    def latents(self) -> Path:
        return self.stats / "latents.parquet"

    @property
    def top_sets(self) -> Path:
        return self.stats / "top_sets.json"


FINAL = StatsFiles(STATS, DETAILS)
