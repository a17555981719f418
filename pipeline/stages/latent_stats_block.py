"""`latent_stats_block@<b>`: which latents of block b's SAE fire for which class, and the top
sets steering block b uses, for each block b in `extract.layers`.

The same statistics as `latent_stats` (the `stats` params) from block b's SAE on the column
`x_block<b>` of the embeddings; written to data/stats_blocks/block<b>/ (latents.parquet,
top_sets.json) and metrics/details/latent_stats_blocks/block<b>.json, without figures.
"""

from __future__ import annotations

from pipeline.layout import latent_stats_block as files
from pipeline.layout import train_sae_block
from pipeline.params.stats import StatsParams
from pipeline.stages.latent_stats import compute


def run(cfg: StatsParams, block: int) -> None:
    compute(cfg, train_sae_block.files(block).sae, files.files(block), block)
