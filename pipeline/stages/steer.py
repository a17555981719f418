"""`steer`: amplify SAE latent sets and measure accuracy and final-block head usage per class.

Every strategy x alpha (x draw) runs on the test split and, when `steer.select_on` is `val`, on
the validation split. The headline chooses each class's alpha on the selection split and
reports it on test, with bootstrap intervals, against the random-set nulls, and beside the
deployable policy that looks the set and the alpha up by the predicted class; each control
(a plain direction at the per-class steer's norm) gets the same selected, reported policy
against its own null. The class directions come from the training split's stored embeddings
alone. Writes the rows,
the headline and the details (`pipeline.steering.results`) and the data of `dvc plots`; the
figures and metrics/report.md are the `report` stage's.

`steer.blocks` other than `final` steers several blocks at once (`pipeline.steering.multiblock`:
each block with its own SAE and sets, exact and sequential): the same analysis then runs on the
heads of every gated block together (usage = their mean, so the headline rule minimises the
model's GFLOPs), and blocks.parquet holds each gated block's own usage per row.
"""

from __future__ import annotations

import logging

import torch

from pipeline.checks import same_classes, same_rows, same_width
from pipeline.data.dataset import load_images
from pipeline.data.embeddings import read_embeddings
from pipeline.errors import ParamsError, PipelineError
from pipeline.interpret.top_sets import read_top_sets
from pipeline.layout import download, extract, finetune, latent_stats, train_sae
from pipeline.layout import steer as files
from pipeline.model.config import ModelConfig, head_names
from pipeline.model.flops import flop_model
from pipeline.model.gated_vit import GatedViT, load_gated_vit, resolve_head_path
from pipeline.model.record import read_record
from pipeline.params.steer import SteerParams
from pipeline.runtime import pick_device
from pipeline.sae.base import SparseAutoencoder
from pipeline.sae.registry import load_sae
from pipeline.steering.analysis import RunInfo, UsageCost, analyse
from pipeline.steering.controls import directions_for, write_directions
from pipeline.steering.headline import ClassHeadline
from pipeline.steering.loading import block_steering
from pipeline.steering.multiblock import BlocksSweep, BlockSteering, run_blocks_sweep
from pipeline.steering.propagate import resolve_blocks
from pipeline.steering.results import (
    SteerDetails,
    class_usage_rows,
    curve_rows,
    write_block_rows,
    write_details,
    write_headline,
    write_results,
)
from pipeline.steering.strategies import SteeringSets
from pipeline.steering.sweep import Tally, Variant, latent_sets, result_rows, run_sweep, variants_for
from pipeline.storage import atomic_path, clean_outputs, rounded, weights_sha256, write_json

log = logging.getLogger(__name__)


def sweep_split(split: str, model: GatedViT, config: ModelConfig, sae: SparseAutoencoder, sets: SteeringSets,
                variants: list[Variant], sp: SteerParams, device: torch.device) -> Tally:
    """The sweep on one split, checked against that split's stored embeddings."""
    images_path, embeddings_path = download.dataset_split(split), extract.embeddings_split(split)
    images = load_images(images_path)
    stored = read_embeddings(embeddings_path)
    same_width(stored.dim, embeddings_path, sae.dim, train_sae.SAE_CONFIG, rerun="extract")
    same_rows(stored.labels, embeddings_path, images.labels, images_path, rerun="extract")
    log.info("steering %s: %d variants x %d images", split, len(variants), len(images.labels))
    tally, cls_inputs = run_sweep(model, sae, sets, images.images, images.labels, config, variants, sp.mode, sp.keep_error,
                                  sp.batch_size, device)
    # The recomputed final-block inputs must be the stored ones (same model, same images).
    if not torch.allclose(cls_inputs, stored.x, atol=1e-4, rtol=1e-4):
        raise PipelineError(f"{embeddings_path}: stored x differs from the model's; rerun extract")
    return tally


def run(sp: SteerParams) -> None:
    variants = variants_for(sp.strategies, sp.alphas, sp.null_draws)  # unknown strategies: exit 2
    clean_outputs(*files.WRITES)
    model, config = load_gated_vit(finetune.MODEL)
    try:
        blocks = resolve_blocks(sp.blocks, model)
    except ValueError as exc:
        raise ParamsError(f"steer.{exc}") from None
    if blocks != [model.depth - 1]:
        return run_blocks(sp, model, config, blocks, variants)
    sae = load_sae(train_sae.SAE)
    same_width(sae.dim, train_sae.SAE_CONFIG, model.vit.embed_dim, finetune.MODEL_CONFIG, rerun="train_sae")
    top_sets = read_top_sets(latent_stats.TOP_SETS, classes=(config.class_names, finetune.MODEL_CONFIG),
                             width=(sae.n_latents, train_sae.SAE_CONFIG))
    train_path = extract.embeddings_split("train")
    train = read_embeddings(train_path)
    same_width(train.dim, train_path, sae.dim, train_sae.SAE_CONFIG, rerun="extract")
    same_classes(train.class_names, train_path, config.class_names, finetune.MODEL_CONFIG, rerun="extract")
    directions = directions_for(model, train.x, train.labels, sp.null_draws, sp.seed)
    sets = latent_sets(top_sets, sp.null_draws, sp.seed, directions)
    device = pick_device(sp.device)
    model.head_path = resolve_head_path(sp.heads, device)

    splits = ["test"] if sp.select_on == "test" else [sp.select_on, "test"]
    tallies = {split: sweep_split(split, model, config, sae, sets, variants, sp, device) for split in splits}
    rows = {split: result_rows(tally, config.class_names) for split, tally in tallies.items()}
    run_info = RunInfo(variants=len(variants), head_path=model.head_path, model_sha256=weights_sha256(finetune.MODEL))
    cost = UsageCost(flop_model(model), read_record(finetune.DETAILS).head_usage_per_block, [model.depth - 1])
    details, headline = analyse(tallies, rows, sp, config.class_names, model.num_heads, cost, run_info)

    with atomic_path(files.RESULTS_DIR, directory=True) as tmp:  # both tables appear together
        write_results(tmp / files.RESULTS.name, [{"split": split, **row} for split in splits for row in rows[split]], model.num_heads)
        write_headline(tmp / files.HEADLINE.name, headline, model.num_heads)
        write_directions(tmp / files.DIRECTIONS.name, directions)
    write_outputs(details, headline)


def write_outputs(details: SteerDetails, headline: list[ClassHeadline]) -> None:
    """The details, the headline metrics and the `dvc plots` data."""
    write_details(files.DETAILS, details)
    write_json(files.METRICS, rounded(details.metrics()))
    write_json(files.ACCURACY, curve_rows(details.strategies, "accuracy"))
    write_json(files.USAGE, curve_rows(details.strategies, "head_usage"))
    write_json(files.CLASS_USAGE, class_usage_rows(headline))
    log.info("baseline accuracy %.4f usage %.3f", details.baseline.accuracy, details.baseline.head_usage)


# ------------------------------------------------------------------------ several blocks
def sweep_blocks_split(split: str, model: GatedViT, config: ModelConfig, steered: dict[int, BlockSteering],
                       variants: list[Variant], sp: SteerParams, device: torch.device) -> BlocksSweep:
    """The multi-block sweep on one split, each steered block's unsteered CLS inputs checked
    against that split's stored ones."""
    images_path, embeddings_path = download.dataset_split(split), extract.embeddings_split(split)
    images = load_images(images_path)
    log.info("steering blocks %s on %s: %d variants x %d images", sorted(steered), split, len(variants), len(images.labels))
    sweep = run_blocks_sweep(model, steered, images.images, images.labels, config, variants, sp.mode, sp.keep_error,
                             sp.batch_size, device)
    for block, cls_inputs in sweep.cls_inputs.items():
        stored = read_embeddings(embeddings_path, None if block == model.depth - 1 else block)
        same_rows(stored.labels, embeddings_path, images.labels, images_path, rerun="extract")
        if not torch.allclose(cls_inputs, stored.x, atol=1e-4, rtol=1e-4):
            raise PipelineError(f"{embeddings_path}: stored CLS inputs of block {block} differ from the model's; rerun extract")
    naive = len(variants) * len(images.labels)
    log.info("%s: distinct (stream, pattern) runs per block %s, against %d variant-image pairs naively", split,
             dict(sorted(sweep.distinct.items())), naive)
    return sweep


def run_blocks(sp: SteerParams, model: GatedViT, config: ModelConfig, blocks: list[int], variants: list[Variant]) -> None:
    """Steering several blocks (docs/METHOD.md, section 8): the same analysis as the final-block
    sweep on the usage of every gated block together (their mean, affine in the GFLOPs), and
    each block's own rows in blocks.parquet."""
    built = {b: block_steering(model, config, b, sp.null_draws, sp.seed) for b in blocks}
    steered = {b: s for b, (s, _) in built.items()}
    device = pick_device(sp.device)
    model.head_path = resolve_head_path(sp.heads, device)
    gated = list(range(model.keep_layers, model.depth))
    splits = ["test"] if sp.select_on == "test" else [sp.select_on, "test"]
    sweeps = {split: sweep_blocks_split(split, model, config, steered, variants, sp, device) for split in splits}
    tallies = {split: sweep.combined for split, sweep in sweeps.items()}
    rows = {split: result_rows(tally, config.class_names) for split, tally in tallies.items()}
    n_heads = len(gated) * model.num_heads
    names = [f"b{b}{name}" for b in gated for name in head_names(model.num_heads, sp.head_index_base)]
    run_info = RunInfo(variants=len(variants), head_path=model.head_path, model_sha256=weights_sha256(finetune.MODEL))
    cost = UsageCost(flop_model(model), read_record(finetune.DETAILS).head_usage_per_block, gated)
    details, headline = analyse(tallies, rows, sp, config.class_names, n_heads, cost, run_info, names)
    details.settings.blocks, details.settings.gated_blocks = blocks, gated

    block_rows = [{"split": split, "block": b, **row} for split in splits for b in gated
                  for row in result_rows(sweeps[split].tallies[b], config.class_names)]
    with atomic_path(files.RESULTS_DIR, directory=True) as tmp:
        write_results(tmp / files.RESULTS.name, [{"split": split, **row} for split in splits for row in rows[split]], n_heads)
        write_headline(tmp / files.HEADLINE.name, headline, n_heads)
        write_block_rows(tmp / files.BLOCKS.name, block_rows, model.num_heads)
        write_directions(tmp / files.DIRECTIONS.name, built[blocks[-1]][1])  # the last steered block's
    write_outputs(details, headline)
