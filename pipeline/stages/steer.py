"""`steer`: amplify SAE latent sets and measure accuracy and final-block head usage per class.

Every strategy x alpha (x draw) runs on the test split and, when `steer.select_on` is `val`, on
the validation split. The headline chooses each class's alpha on the selection split and
reports it on test, with bootstrap intervals, against the random-set nulls, and beside the
deployable policy that looks the set and the alpha up by the predicted class.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline import cards, plots
from pipeline.checks import same_classes, same_rows, same_width
from pipeline.dataset import load_images, read_image_groups
from pipeline.embeddings import read_embeddings
from pipeline.errors import PipelineError
from pipeline.flops import flop_model
from pipeline.gated_vit import load_gated_vit, resolve_head_path
from pipeline.layout import download, extract, finetune, interpret, latent_stats, train_sae
from pipeline.layout import steer as files
from pipeline.params import Params
from pipeline.report import featured, render_report
from pipeline.runtime import pick_device
from pipeline.sae import load_sae
from pipeline.stats import membership
from pipeline.steer_analysis import analyse
from pipeline.steering import (
    Tally,
    Variant,
    random_class_sets,
    random_sets,
    result_rows,
    run_sweep,
    variants_for,
)
from pipeline.storage import (
    atomic_path,
    clean_outputs,
    read_json,
    rounded,
    weights_sha256,
    write_json,
    write_parquet,
    write_text,
)
from pipeline.strategies import STRATEGIES, LatentSets

log = logging.getLogger(__name__)


def load_sets(top_sets: dict, n_latents: int, class_names: list[str], draws: int, seed: int) -> LatentSets:
    same_classes(top_sets.get("class_names") or [], latent_stats.TOP_SETS, class_names, finetune.MODEL_CONFIG, rerun="latent_stats")
    same_width(top_sets.get("n_latents"), latent_stats.TOP_SETS, n_latents, train_sae.SAE_CONFIG, rerun="latent_stats", what="number of latents")
    mean_active = torch.tensor(top_sets["mean_active_value"], dtype=torch.float32)
    global_set = membership([top_sets["global"]], n_latents)[0]
    per_class = membership([top_sets["per_class"][name] for name in class_names], n_latents)
    alive = mean_active > 0
    return LatentSets(
        per_class=per_class,
        global_set=global_set,
        random=random_sets(alive, int(global_set.sum()), draws, seed),
        random_per_class=random_class_sets(alive, per_class.sum(1).tolist(), draws, seed),
        mean_active=mean_active,
    )


def write_results(rows: list[dict], n_heads: int, path: Path) -> None:
    schema = pa.schema(
        [
            ("split", pa.string()),
            ("strategy", pa.string()),
            ("alpha", pa.float64()),
            ("draw", pa.int32()),
            ("class_id", pa.int32()),
            ("class", pa.string()),
            ("n", pa.int32()),
            ("accuracy", pa.float64()),
            ("head_usage", pa.float64()),
            *[(f"keep_h{h}", pa.float64()) for h in range(n_heads)],
        ]
    )
    write_parquet(path, pa.Table.from_pylist(rows, schema=schema))


def sweep_split(split: str, model, sae, sets: LatentSets, config, variants: list[Variant], sp, device) -> Tally:
    """The sweep on one split, checked against that split's stored embeddings."""
    images_path, embeddings_path = download.dataset_split(split), extract.embeddings_split(split)
    images = load_images(images_path)
    stored = read_embeddings(embeddings_path)
    same_width(stored.dim, embeddings_path, sae.dim, train_sae.SAE_CONFIG, rerun="extract")
    same_rows(stored.labels, embeddings_path, images.labels, images_path, rerun="extract")
    log.info("steering %s: %d variants x %d images", split, len(variants), len(images.labels))
    tally, cls_inputs = run_sweep(model, sae, sets, images.images, images.labels, config, variants, sp.mode, sp.keep_error, sp.batch_size, device)
    # The recomputed final-block inputs must be the stored ones (same model, same images).
    if not torch.allclose(cls_inputs, stored.x, atol=1e-4, rtol=1e-4):
        raise PipelineError(f"{embeddings_path}: stored x differs from the model's; rerun extract")
    return tally


def run(params: Params) -> None:
    sp = params.steer
    variants = variants_for(sp.strategies, sp.alphas, sp.null_draws)  # unknown strategies: exit 2
    clean_outputs(*files.WRITES)
    model, config = load_gated_vit(finetune.MODEL)
    sae = load_sae(train_sae.SAE)
    same_width(sae.dim, train_sae.SAE_CONFIG, model.vit.embed_dim, finetune.MODEL_CONFIG, rerun="train_sae")
    class_names, n_heads = config.class_names, model.num_heads
    try:
        sets = load_sets(read_json(latent_stats.TOP_SETS), sae.n_latents, class_names, sp.null_draws, sp.seed)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # hand-edited or foreign file
        raise PipelineError(f"{latent_stats.TOP_SETS}: malformed ({type(exc).__name__}: {exc}); rerun latent_stats") from None
    device = pick_device(sp.device)
    model.head_path = resolve_head_path(sp.heads, device)
    splits = ["test"] if sp.select_on == "test" else [sp.select_on, "test"]
    tallies = {split: sweep_split(split, model, sae, sets, config, variants, sp, device) for split in splits}
    rows = {split: result_rows(tally, class_names) for split, tally in tallies.items()}
    with atomic_path(files.RESULTS_DIR, directory=True) as tmp:
        write_results([{"split": split, **row} for split in splits for row in rows[split]], n_heads, tmp / "results.parquet")

    flops, usage_per_block = flop_model(model), read_json(finetune.DETAILS)["head_usage_per_block"]
    metrics, headline = analyse(tallies, rows, sp, class_names, n_heads, flops, usage_per_block)
    metrics["settings"]["variants"] = len(variants)
    metrics["settings"]["head_path"] = model.head_path
    # which weights these rows came from: `export-pruned --heads headline` refuses others
    metrics["settings"]["model_sha256"] = weights_sha256(finetune.MODEL)
    base_acc, base_usage = metrics["baseline"]["accuracy"], metrics["baseline"]["head_usage"]
    curves = metrics["strategies"]
    head_name = lambda h: f"h{h + sp.head_index_base}"  # noqa: E731
    if headline:
        summary = metrics["per_class_headline"]
        # short names keep `dvc exp show` legible at 120 columns (docs/EXPERIMENTS.md explains them)
        write_json(files.METRICS, rounded({
            "usage_drop": 0.0 - summary["mean_usage_change"],
            "acc_change": summary["mean_accuracy_change"],
            "fewer_heads": summary["classes_with_reduction"],
        }))
    else:
        write_json(files.METRICS, {})

    # dvc plots data (the paper's Figures 2 and 3): one row per (alpha, strategy), with the
    # spread over draws as a band
    for key, path in (("accuracy", files.ACCURACY), ("head_usage", files.USAGE)):
        write_json(path, [
            {"alpha": a, "series": name, key: rounded(value), "low": rounded(band[0]), "high": rounded(band[1])}
            for name, curve in curves.items()
            for a, value, band in zip(curve["alpha"], curve[key], curve[f"{key}_range"])
        ])
    write_json(files.CLASS_USAGE,
               [{"class": c.name, "baseline_usage": c.baseline_usage, "steered_usage": c.usage, "alpha": c.alpha} for c in headline])
    styles = {name: (STRATEGIES[name].colour, STRATEGIES[name].marker) for name in curves}
    plots.steering_curves(curves, styles, files.CURVES_PNG)
    heads = [head_name(h) for h in range(n_heads)]
    if headline:
        baseline_keep = [[r[f"keep_h{h}"] for h in range(n_heads)] for r in rows["test"] if r["strategy"] == "per_class" and r["alpha"] == 0.0]
        plots.keep_rate_heatmap(baseline_keep, [c.keep_rates for c in headline], class_names, heads, files.HEAD_KEEP_HEATMAP)
        plots.usage_scatter([c.baseline_usage for c in headline], [c.usage for c in headline], class_names, files.CLASS_USAGE_PNG)
    stats_details = read_json(latent_stats.DETAILS)
    explained = explain(params, rows["test"], headline, heads, stats_details, read_json(latent_stats.TOP_SETS))
    metrics["interpretation"] = {k: explained[k] for k in ("shift_vs_keep", "global_set")}
    write_json(files.DETAILS, metrics)
    report = render_report(params, config, stats_details, metrics, headline, heads,
                           read_json(finetune.DETAILS), read_json(train_sae.DETAILS), explained)
    write_text(files.REPORT, report)
    log.info("baseline accuracy %.4f usage %.3f; report in %s", base_acc, base_usage, files.REPORT)


def explain(params: Params, rows: list[dict], headline: list, heads: list[str], stats_details: dict, top_sets: dict) -> dict:
    """What `interpret` predicted against what the sweep measured, the featured classes' cards,
    and their figures (class cards, attribution heatmap, predicted-vs-measured scatter)."""
    sp, ip = params.steer, params.interpret
    interp = cards.load_interpretation()
    comparison = cards.compare_shifts(interp, rows, sp.mode, len(heads))
    plots.shift_scatter(
        {heads[h]: (comparison.predicted[comparison.head == h], comparison.measured[comparison.head == h]) for h in range(len(heads))},
        files.SHIFT_SCATTER, f"Steering per class and globally (mode {sp.mode}): predicted vs measured, per head",
    )
    # the global set at the largest alpha: the direction it pushes each head, predicted and measured
    amax = max(sp.alphas)
    counts = {r["class_id"]: r["n"] for r in rows if r["strategy"] == "global" and r["alpha"] == 0.0 and r["draw"] == 0}
    weights = np.array([counts.get(c, 0) for c in range(interp.unit_shifts[("global", sp.mode)].shape[0])], dtype=float)
    predicted = amax * (weights @ interp.unit_shifts[("global", sp.mode)]) / max(weights.sum(), 1.0)
    measured = [0.0] * len(heads)
    for r in rows:
        if r["strategy"] == "global" and r["draw"] == 0 and r["alpha"] in (0.0, amax):
            sign = 1.0 if r["alpha"] == amax else -1.0
            for h in range(len(heads)):
                measured[h] += sign * r["n"] * r[f"keep_h{h}"] / max(weights.sum(), 1.0)
    global_set = {"alpha": amax, "predicted_logit_shift": [rounded(v) for v in predicted.tolist()],
                  "measured_keep_change": [rounded(v) for v in measured]} if amax > 0 and weights.sum() else None

    class_cards, image_rows, heat_rows, heat_names = [], [], [], []
    for c in featured(headline, sp.top_classes):
        latents = top_sets["per_class"][c.name][: ip.card_latents]
        related = [r["class"] for r in stats_details.get("related", {}).get(c.name, [])]
        class_cards.append({
            "name": c.name,
            "latents": [{"line": cards.latent_line(interp, j), "pushes": cards.pushes(interp, j, heads)} for j in latents],
            "alpha": c.alpha, "usage": (c.baseline_usage, c.usage), "accuracy": (c.baseline_accuracy, c.accuracy),
            "related": related,
        })
        for j in latents:
            image_rows.append((c.name, j, interp.gallery_rows.get(j, [])[: ip.grid_images]))
            heat_rows.append(interp.attribution[j])
            heat_names.append(f"{c.name}: latent {j}")
    if image_rows:
        images, _, _ = read_image_groups(download.dataset_split("train"), [gallery for _, _, gallery in image_rows])
        drawn = [(f"{name} | {cards.latent_line(interp, j)} | pushes {cards.pushes(interp, j, heads)}", pixels)
                 for (name, j, _), pixels in zip(image_rows, images)]
        plots.image_rows(drawn, files.CLASS_CARDS, "Class cards: each featured class's most frequent latents and the training images they fire on most")
        plots.attribution_heatmap(np.stack(heat_rows), heat_names, heads, files.ATTRIBUTION_HEATMAP,
                                  "Final-block gate-logit change per unit activation (featured classes' latents)")
    else:  # no headline (per_class not swept): the figures still exist, empty
        plots.image_rows([], files.CLASS_CARDS, "Class cards: no featured classes (per_class not among steer.strategies)")
        plots.attribution_heatmap(np.zeros((0, len(heads))), [], heads, files.ATTRIBUTION_HEATMAP, "no featured classes")
    return {"shift_vs_keep": rounded(comparison.summary()), "global_set": global_set, "cards": class_cards,
            "purity": read_json(interpret.DETAILS), "keep_error": sp.keep_error}
