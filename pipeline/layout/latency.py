"""`latency` writes what each policy costs as deployed (pipeline.steering.deploy)."""

from pathlib import Path

from pipeline.layout import (
    ceiling,
    download,
    extract,
    finetune,
    latent_stats,
    latent_stats_block,
    steer,
    train_sae,
    train_sae_block,
)

DETAILS = Path("metrics/details/latency.json")
"""Per policy (unsteered, the per-class headline as oracle and as the predicted-class policy,
the ceiling): accuracy, usage per gated block, GFLOPs per image and, when `latency.measure`,
milliseconds per batch and per image at each batch size."""

READS = (download.DATASET, extract.EMBEDDINGS, finetune.MODEL, train_sae.SAE, train_sae_block.SAE_BLOCKS, latent_stats.STATS,
         latent_stats_block.STATS_BLOCKS, steer.DETAILS, ceiling.CEILING)
WRITES = (DETAILS,)
