"""`interpret`: what each SAE latent responds to and which final-block heads it moves.

Reads the train and test embeddings, the SAE, the top sets of `latent_stats`, the fine-tuned
model (only its final decision network) and, for the figure, the training images the galleries
point at. Writes (pipeline/layout/interpret.py):
- data/interpret/galleries.parquet: every alive latent's top-N training images (one streaming
  pass, pipeline.interpret.latents.TopImages);
- data/interpret/latents.parquet: per latent its firing rate, automatic label, purity, entropy
  and gate-logit attribution per head;
- data/interpret/shifts.parquet: the mean gate-logit shift per head that steering each class
  (its own set, and the global set) at alpha = 1 predicts on the test split; `steer` sets it
  against what it measures;
- metrics/interpret.json, metrics/details/interpret.json: purity of the SAE basis against random
  and PCA directions;
- metrics/plots/latent_grid.png (the global set's galleries), metrics/plots/purity.png.
Nothing here reads `steer`'s params or outputs: a steering change does not rerun it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import torch

from pipeline.checks import labels_in_range, same_classes, same_width
from pipeline.data.dataset import read_image_groups
from pipeline.data.embeddings import EmbeddingTable, read_embeddings
from pipeline.errors import PipelineError
from pipeline.interpret import latents as it
from pipeline.interpret import stats as st
from pipeline.interpret.top_sets import TopSets, read_top_sets
from pipeline.layout import download, extract, finetune, latent_stats, train_sae
from pipeline.layout import interpret as files
from pipeline.model.gated_vit import load_gated_vit
from pipeline.params.interpret import InterpretParams
from pipeline.progress import progress
from pipeline.report import plots
from pipeline.sae.base import SparseAutoencoder
from pipeline.sae.registry import load_sae
from pipeline.storage import clean_outputs, rounded, write_json, write_parquet

log = logging.getLogger(__name__)

TRAIN, TEST = extract.embeddings_split("train"), extract.embeddings_split("test")


def run(ip: InterpretParams) -> None:
    clean_outputs(*files.WRITES)
    sae = load_sae(train_sae.SAE).to("cpu").eval()
    model, config = load_gated_vit(finetune.MODEL)
    train, test = read_embeddings(TRAIN), read_embeddings(TEST)
    class_names = config.class_names
    for table, path in ((train, TRAIN), (test, TEST)):
        same_classes(table.class_names, path, class_names, finetune.MODEL_CONFIG, rerun="extract")
        same_width(table.dim, path, sae.dim, train_sae.SAE_CONFIG, rerun="train_sae")
        labels_in_range(table.labels, path, len(class_names))
    n_latents, n_classes = sae.n_latents, len(class_names)
    top_sets = read_top_sets(latent_stats.TOP_SETS, classes=(class_names, finetune.MODEL_CONFIG), width=(n_latents, train_sae.SAE_CONFIG))

    start = time.perf_counter()
    with torch.no_grad():
        top, train_stats = stream_train(sae, train, n_classes, ip)
    log.info("top-%d images of %d latents over %d training rows in %.1f s", ip.top_n, n_latents, len(train.labels), time.perf_counter() - start)

    sae_purity = it.class_purity(train_stats.value_sum_class.T)
    alive = train_stats.alive
    baselines = baseline_purities(train, train_stats.freq_all[alive], n_classes, ip.baseline_seed, ip.top_n)
    with torch.no_grad():
        weight = model.decision_net(model.depth - 1).weight.detach().double()
        attribution = it.head_attribution(weight, sae.decoder_directions().detach().double())
        test_stats = st.encode_stats(sae.encode_sparse, test.x, test.labels, n_latents, n_classes, ip.batch_size, desc="encode test")
    shifts = unit_shifts(top_sets, test_stats, attribution, class_names)

    grid_rows = latent_grid_rows(top_sets.global_set[: ip.grid_latents], top, train_stats, sae_purity, class_names, ip)  # reads images first
    write_galleries(top, train)
    write_latents(train_stats, sae_purity, attribution, class_names)
    write_shifts(shifts, class_names, model.num_heads)

    chance = float(train_stats.class_counts.max() / train_stats.class_counts.sum())
    sae_share = it.top_label_share(top.rows, train.labels)[alive]
    summaries = {"sae": it.purity_summary(it.Purity(sae_purity.label[alive], sae_purity.purity[alive], sae_purity.entropy[alive]), sae_share),
                 **{name: it.purity_summary(*found) for name, found in baselines.items()}}
    # one headline column: with a second (PCA's purity) the documented `dvc exp show` of a demo
    # sweep no longer fits 120 columns; the baselines are in the details and the report
    write_json(files.METRICS, rounded({"purity": summaries["sae"]["mean"]}))
    write_json(files.DETAILS, rounded({
        "purity": summaries,
        "chance_purity": chance,
        "alive_latents": int(alive.sum()),
        "n_latents": n_latents,
        "top_n": ip.top_n,
        "train_rows": len(train.labels),
        "attribution": {
            "mean_abs_per_head": attribution[alive].abs().mean(0).tolist(),
            "max_abs": float(attribution[alive].abs().max()) if alive.any() else 0.0,
        },
        "baselines": "random: one unit direction per alive latent; pca: the leading principal directions "
                     "with both signs, at most 2 x width; each fires on the firing rate of a paired alive latent",
    }))
    plots.image_rows(grid_rows, files.LATENT_GRID, f"Global top set: each latent's {ip.grid_images} most activating training images")
    plots.purity_histograms(
        {"SAE latents": sae_purity.purity[alive], "random directions": baselines["random"][0].purity,
         "PCA directions": baselines["pca"][0].purity},
        chance, files.PURITY_PLOT,
    )
    log.info("purity: SAE %.3f, random %.3f, PCA %.3f (largest class share %.3f)",
             summaries["sae"]["mean"], summaries["random"]["mean"], summaries["pca"]["mean"], chance)


def stream_train(sae: SparseAutoencoder, train: EmbeddingTable, n_classes: int, ip: InterpretParams) -> tuple[it.TopImages, st.LatentStats]:
    """One pass over the training embeddings: each latent's top-N images and the per-class
    activation mass, without holding all codes."""
    top = it.TopImages.empty(sae.n_latents, ip.top_n)
    stats = st.empty_stats(sae.n_latents, n_classes)
    for begin in progress(range(0, len(train.labels), ip.batch_size), desc="galleries"):
        x, labels = train.x[begin:begin + ip.batch_size], train.labels[begin:begin + ip.batch_size]
        values, indices = sae.encode_sparse(x)
        top.update(values, indices, begin)
        stats = stats + st.firing_stats(values, indices, labels, sae.n_latents, n_classes)
    return top, stats


def baseline_purities(train: EmbeddingTable, rates: torch.Tensor, n_classes: int, seed: int, top_n: int) -> dict[str, tuple[it.Purity, torch.Tensor]]:
    """Random and PCA directions, each paired with an alive latent's firing rate (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    shuffled = rates[torch.randperm(len(rates), generator=gen)]
    x = train.x.float()
    random_dirs = it.random_directions(len(rates), x.shape[1], seed).float()
    pca_dirs = it.pca_directions(x, len(rates)).float()
    return {
        "random": it.direction_purity(x, random_dirs, shuffled, train.labels, n_classes, top_n),
        "pca": it.direction_purity(x, pca_dirs, shuffled[: len(pca_dirs)], train.labels, n_classes, top_n),
    }


def unit_shifts(top_sets: TopSets, test_stats: st.LatentStats, attribution: torch.Tensor, class_names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{strategy: {"scale": (C, H), "add": (C, H)}}: the mean gate-logit shift of each class's
    test images at alpha = 1 when steered with its own set (`per_class`) or the global set."""
    per_class, global_set = top_sets.masks()
    mean_active = top_sets.mean_active(torch.float64)
    counts = test_stats.class_counts.double().clamp_min(1)[:, None]
    mean_z = test_stats.value_sum_class / counts  # (C, L): E over the class's images, zeros included
    own, everyone = it.SHIFT_SETS
    masks = {own: per_class, everyone: global_set.expand_as(per_class)}
    return {
        name: {"scale": it.unit_logit_shifts(mask, mean_z, attribution),
               "add": it.unit_logit_shifts(mask, mean_active.expand_as(mean_z), attribution)}
        for name, mask in masks.items()
    }


GALLERY_SCHEMA = pa.schema([
    ("latent", pa.int32()), ("rank", pa.int32()), ("row", pa.int64()), ("index", pa.int64()),
    ("label", pa.int32()), ("activation", pa.float32()),
])


def write_galleries(top: it.TopImages, train: EmbeddingTable) -> None:
    keep = top.rows >= 0
    latent, rank = torch.nonzero(keep, as_tuple=True)
    rows = top.rows[keep]
    table = pa.table({
        "latent": latent.numpy().astype(np.int32), "rank": rank.numpy().astype(np.int32),
        "row": rows.numpy(), "index": train.index[rows].numpy(), "label": train.labels[rows].numpy().astype(np.int32),
        "activation": top.values[keep].numpy().astype(np.float32),
    }, schema=GALLERY_SCHEMA)
    write_parquet(files.GALLERIES, table)


def write_latents(stats: st.LatentStats, purity: it.Purity, attribution: torch.Tensor, class_names: list[str]) -> None:
    n_heads = attribution.shape[1]
    label = purity.label
    columns = {
        "latent": np.arange(stats.n_latents, dtype=np.int32),
        "firing_rate": stats.freq_all.numpy(),
        "mean_activation": stats.mean_active_all.numpy(),
        "label_id": label.numpy().astype(np.int32),
        "label": np.array([class_names[c] if c >= 0 else "" for c in label.tolist()], dtype=object),
        "purity": purity.purity.numpy(),
        "entropy": purity.entropy.numpy(),
        **{f"attr_h{h}": attribution[:, h].numpy() for h in range(n_heads)},
    }
    write_parquet(files.LATENTS, pa.table(columns))


def write_shifts(shifts: dict[str, dict[str, torch.Tensor]], class_names: list[str], n_heads: int) -> None:
    records = {"strategy": [], "class_id": [], "class": [], "head": [], "shift_scale": [], "shift_add": []}
    for strategy, by_mode in shifts.items():
        for c, name in enumerate(class_names):
            for h in range(n_heads):
                records["strategy"].append(strategy)
                records["class_id"].append(c)
                records["class"].append(name)
                records["head"].append(h)
                records["shift_scale"].append(float(by_mode["scale"][c, h]))
                records["shift_add"].append(float(by_mode["add"][c, h]))
    schema = pa.schema([("strategy", pa.string()), ("class_id", pa.int32()), ("class", pa.string()), ("head", pa.int32()),
                        ("shift_scale", pa.float64()), ("shift_add", pa.float64())])
    write_parquet(files.SHIFTS, pa.table(records, schema=schema))


def latent_title(latent: int, rate: float, label: str, purity: float) -> str:
    return f"latent {latent}: fires on {rate:.1%} of training images; label '{label}', purity {purity:.2f}"


def latent_grid_rows(latents: list[int], top: it.TopImages, stats: st.LatentStats, purity: it.Purity,
                     class_names: list[str], ip: InterpretParams) -> list[tuple[str, np.ndarray]]:
    """The global set's galleries as (title, images) rows, checked against the data set."""
    try:
        galleries = [[r for r in top.rows[j, :ip.grid_images].tolist() if r >= 0] for j in latents]
        images, _, n_rows = read_image_groups(download.dataset_split("train"), galleries)
    except (IndexError, KeyError, ValueError, pa.ArrowException) as exc:
        raise PipelineError(f"{download.dataset_split('train')}: cannot read the gallery images ({exc}); rerun download") from None
    if n_rows != stats.n_samples:
        raise PipelineError(f"{download.dataset_split('train')} has {n_rows} rows, {TRAIN} {stats.n_samples}; rerun extract")
    rows = []
    for j, pixels in zip(latents, images):
        label = class_names[int(purity.label[j])] if purity.label[j] >= 0 else "-"
        rows.append((latent_title(j, float(stats.freq_all[j]), label, float(purity.purity[j])), pixels))
    return rows
