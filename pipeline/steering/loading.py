"""Each steered block's SAE, latent sets and control directions, from the stages' outputs: the
final block's from models/sae and data/stats, an earlier block b's from `train_sae_block@<b>`
and `latent_stats_block@<b>` (read by `steer` and `latency`)."""

from __future__ import annotations

from pipeline.checks import same_classes, same_width
from pipeline.data.embeddings import read_embeddings
from pipeline.errors import PipelineError
from pipeline.interpret.top_sets import read_top_sets
from pipeline.layout import extract, finetune, latent_stats, latent_stats_block, train_sae, train_sae_block
from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import GatedViT
from pipeline.sae.registry import load_sae
from pipeline.steering.multiblock import BlockSteering, block_directions
from pipeline.steering.strategies import Directions
from pipeline.steering.sweep import latent_sets


def block_steering(model: GatedViT, config: ModelConfig, block: int, draws: int, seed: int) -> tuple[BlockSteering, Directions]:
    """Block `block`'s SAE, sets and control directions (`draws` random ones, `seed`: as
    `steer.null_draws` and `steer.seed`): the final block's from models/sae and data/stats, an
    earlier block's from its `train_sae_block` / `latent_stats_block` outputs."""
    final = block == model.depth - 1
    sae_dir = train_sae.SAE if final else train_sae_block.files(block).sae
    sets_path = latent_stats.TOP_SETS if final else latent_stats_block.files(block).top_sets
    if not (sae_dir / "config.json").exists() or not sets_path.exists():
        raise PipelineError(f"steer.blocks includes block {block}, which has no SAE or top sets ({sae_dir}, {sets_path}): "
                            f"add {block} to extract.layers (its train_sae_block and latent_stats_block stages then run)")
    sae = load_sae(sae_dir)
    same_width(sae.dim, sae_dir / "config.json", model.vit.embed_dim, finetune.MODEL_CONFIG, rerun="train_sae")
    top_sets = read_top_sets(sets_path, classes=(config.class_names, finetune.MODEL_CONFIG), width=(sae.n_latents, sae_dir / "config.json"))
    train_path = extract.embeddings_split("train")
    train = read_embeddings(train_path, None if final else block)
    same_classes(train.class_names, train_path, config.class_names, finetune.MODEL_CONFIG, rerun="extract")
    directions = block_directions(model, block, train.x, train.labels, draws, seed)
    return BlockSteering(sae, latent_sets(top_sets, draws, seed, directions)), directions
