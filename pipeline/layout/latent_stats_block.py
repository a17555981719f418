"""`latent_stats_block@<b>` writes the statistics of block b's SAE (one stage per block b in
`extract.layers`, from one `foreach` definition in dvc.yaml): latents.parquet and top_sets.json
as data/stats/ holds them, and the details record. No figures: those are the final block's."""

from pathlib import Path

from pipeline.layout import extract, train_sae_block
from pipeline.layout.latent_stats import StatsFiles

STATS_BLOCKS = Path("data/stats_blocks")
"""block<b>/ per block. The folder itself is committed (its README.md), so that `steer` can
depend on it when no block has statistics."""


def files(block: int) -> StatsFiles:
    return StatsFiles(STATS_BLOCKS / f"block{block}", Path("metrics/details/latent_stats_blocks") / f"block{block}.json")


def reads(block: int) -> tuple[Path, ...]:
    return (extract.EMBEDDINGS, train_sae_block.files(block).sae)


def writes(block: int) -> tuple[Path, ...]:
    return (files(block).stats, files(block).details)
