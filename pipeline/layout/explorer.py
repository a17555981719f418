"""`explorer` writes the latent explorer, a static site that opens from disk (pipeline.report.explorer)."""

from pathlib import Path

from pipeline.layout import ceiling, download, interpret, latent_stats, steer

EXPLORER = Path("metrics/explorer")
"""The site: index.html (the page, its data and its scripts inline) and img/ beside it."""
INDEX = EXPLORER / "index.html"
IMAGES = EXPLORER / "img"
"""One thumbnail strip per alive latent: img/latent_<j>.webp, its most activating training images."""

READS = (
    interpret.INTERPRET, latent_stats.STATS, latent_stats.DETAILS, steer.RESULTS_DIR, steer.DETAILS, ceiling.CEILING,
    download.DATASET,
)
WRITES = (EXPLORER,)
