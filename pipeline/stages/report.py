"""`report`: metrics/report.md and the figures it shows, from `steer`'s and `interpret`'s outputs.

Its own stage so that a wording or figure change reruns this alone, never the sweep. It also
joins the two: what `interpret` predicted for each head against what the sweep measured, and
the featured classes' cards (their top latents with their most activating training images).
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.data.dataset import read_image_groups
from pipeline.interpret.cards import (
    ClassCard,
    Interpretation,
    card_latents,
    compare_shifts,
    global_set_shift,
    load_interpretation,
)
from pipeline.interpret.records import StatsRecord, read_stats_record
from pipeline.interpret.top_sets import read_top_sets
from pipeline.layout import ceiling as ceiling_files
from pipeline.layout import download, finetune, interpret, latency, latent_stats, steer, train_sae
from pipeline.layout import report as files
from pipeline.model.config import head_names, read_model_config
from pipeline.model.record import read_record
from pipeline.params.file import Params
from pipeline.report import plots
from pipeline.report.blocks import block_usage
from pipeline.report.render import Ceiling, Explanation, ReportInputs, featured, render_report
from pipeline.steering.ceiling import read_classes as read_ceiling_classes
from pipeline.steering.ceiling import read_details as read_ceiling
from pipeline.steering.ceiling import read_patterns
from pipeline.steering.costs import read_details as read_latency
from pipeline.steering.headline import ClassHeadline
from pipeline.steering.results import read_block_rows, read_details, read_headline, read_results
from pipeline.steering.strategies import PER_CLASS, STRATEGIES
from pipeline.storage import clean_outputs, read_json, to_json_value, write_json, write_text

log = logging.getLogger(__name__)


def run(params: Params) -> None:
    sp = params.steer
    clean_outputs(*files.WRITES)
    config = read_model_config(finetune.MODEL)
    details, headline = read_details(steer.DETAILS), read_headline(steer.HEADLINE)
    rows = read_results(steer.RESULTS, split="test")
    heads = head_names(config.shape.num_heads, sp.head_index_base)
    final_rows, all_heads = rows, heads  # the final block's rows and heads, and those of the sweep's tally
    gated = details.settings.gated_blocks
    if gated is not None:  # a multi-block sweep: its rows cover every gated block's heads
        block_rows = read_block_rows(steer.BLOCKS, split="test")
        final_rows = [r for r in block_rows if r["block"] == gated[-1]]
        all_heads = [f"b{b}{h}" for b in gated for h in heads]
    record = read_record(finetune.DETAILS)
    across = block_usage(details, block_rows if gated is not None else rows, record.head_usage_per_block, config.keep_layers)
    stats = read_stats_record(latent_stats.DETAILS)
    ceiling = Ceiling(read_ceiling(ceiling_files.DETAILS), read_ceiling_classes(ceiling_files.CLASSES))
    explained = explain(params, final_rows, headline, heads, stats)
    inputs = ReportInputs(params=params, config=config, finetune=record, sae=read_json(train_sae.DETAILS),
                          stats=stats, steer=details, headline=headline, head_names=all_heads, explained=explained,
                          ceiling=ceiling, blocks=across, latency=read_latency(latency.DETAILS))

    curves = inputs.curves()
    plots.steering_curves({name: to_json_value(c) for name, c in curves.items()},
                          {name: (STRATEGIES[name].colour, STRATEGIES[name].marker) for name in curves}, files.CURVES_PNG)
    if headline:
        baseline_keep = [[r[f"keep_h{h}"] for h in range(len(all_heads))] for r in rows
                         if r["strategy"] == PER_CLASS and r["alpha"] == 0.0 and r["draw"] == 0]
        plots.keep_rate_heatmap(baseline_keep, [c.keep_rates for c in headline], config.class_names, all_heads, files.HEAD_KEEP_HEATMAP)
        plots.usage_scatter([c.baseline_usage for c in headline], [c.usage for c in headline], config.class_names, files.CLASS_USAGE_PNG)
    draw_frontiers(ceiling, read_patterns(ceiling_files.PATTERNS), final_rows, featured(headline, sp.top_classes))
    series = {"unsteered": across.unsteered, **({"per-class steering (headline)": across.headline} if across.headline else {})}
    blocks_ceiling = ceiling.details.blocks
    if blocks_ceiling is not None:
        series["ceiling across blocks"] = [blocks_ceiling.rows["blocks"].usage[f"b{b}"] for b in across.gated]
    else:  # the final-block ceiling: only the final block moves
        series["ceiling (final block)"] = [*across.unsteered[:-1], across.unsteered[-1] + ceiling.details.summary.mean_usage_change]
    plots.block_usage_bars([f"b{b}" for b in across.gated], series, files.BLOCK_USAGE,
                           f"Head usage per gated block (steered: {', '.join(f'b{b}' for b in across.steered)})")
    write_json(files.DETAILS, to_json_value({"shift_vs_keep": explained.shift_vs_keep, "global_set": explained.global_set}))
    write_text(files.REPORT, render_report(inputs))
    log.info("report in %s", files.REPORT)


def draw_frontiers(ceiling: Ceiling, patterns: list[dict], rows: list[dict], classes: list[ClassHeadline]) -> None:
    """The featured classes' panels: every fixed pattern and the frontier, the ceiling's choice,
    the model's own gates and per-class steering over alpha (test split)."""
    chosen = {c.name: c for c in ceiling.classes}
    panels = []
    for c in classes:
        if c.name not in chosen:
            continue
        mine = [r for r in patterns if r["split"] == "test" and r["class"] == c.name]
        front = ceiling.details.frontier.get(c.name, [])
        steering = sorted((r["alpha"], r["head_usage"], r["accuracy"]) for r in rows
                          if r["strategy"] == PER_CLASS and r["class"] == c.name and r["draw"] == 0)
        k = chosen[c.name]
        panels.append({
            "name": c.name,
            "patterns": ([r["usage"] for r in mine], [r["accuracy"] for r in mine]),
            "frontier": ([f.usage for f in front], [f.test_accuracy for f in front]),
            "ceiling": ([k.usage], [k.accuracy]),
            "own": ([k.baseline_usage], [k.baseline_accuracy]),
            "steering": ([s[1] for s in steering], [s[2] for s in steering]),
        })
    plots.frontier_grid(panels, files.FRONTIER, "Per class, test split: fixed final-block patterns (grey), the frontier chosen on the "
                        "selection split, the ceiling's pattern (star), own gates (black), per-class steering over alpha (green)")


def explain(params: Params, rows: list[dict], headline: list[ClassHeadline], heads: list[str], stats: StatsRecord) -> Explanation:
    """What `interpret` predicted against what the sweep measured, the featured classes' cards,
    and their figures (class cards, attribution heatmap, predicted-vs-measured scatter)."""
    sp, ip = params.steer, params.interpret
    interp = load_interpretation()
    comparison = compare_shifts(interp, rows, sp.mode, len(heads))
    plots.shift_scatter(
        {heads[h]: (comparison.predicted[comparison.head == h], comparison.measured[comparison.head == h]) for h in range(len(heads))},
        files.SHIFT_SCATTER, f"Steering per class and globally (mode {sp.mode}): predicted vs measured, per head",
    )
    top_sets = read_top_sets(latent_stats.TOP_SETS)
    cards = [class_card(interp, c, top_sets.per_class[c.name][: ip.card_latents], heads, stats) for c in featured(headline, sp.top_classes)]
    draw_cards(interp, cards, ip.grid_images, heads)
    return Explanation(shift_vs_keep=comparison.summary(), global_set=global_set_shift(interp, rows, sp.mode, max(sp.alphas), len(heads)),
                       cards=cards, purity=read_json(interpret.DETAILS), keep_error=sp.keep_error)


def class_card(interp: Interpretation, c: ClassHeadline, latents: list[int], heads: list[str], stats: StatsRecord) -> ClassCard:
    return ClassCard(name=c.name, latents=card_latents(interp, latents, heads), alpha=c.alpha,
                     usage=(c.baseline_usage, c.usage), accuracy=(c.baseline_accuracy, c.accuracy),
                     related=[r.name for r in stats.related.get(c.name, [])])


def draw_cards(interp: Interpretation, cards: list[ClassCard], images_per_latent: int, heads: list[str]) -> None:
    """The class cards' image rows and their latents' attribution to the final block's heads."""
    rows = [(card.name, latent) for card in cards for latent in card.latents]
    if not rows:  # no headline (per_class not swept): the figures still exist, empty
        plots.image_rows([], files.CLASS_CARDS, f"Class cards: no featured classes ({PER_CLASS} not among steer.strategies)")
        plots.attribution_heatmap(np.zeros((0, len(heads))), [], heads, files.ATTRIBUTION_HEATMAP, "no featured classes")
        return
    galleries = [interp.gallery_rows.get(latent.latent, [])[:images_per_latent] for _, latent in rows]
    images, _, _ = read_image_groups(download.dataset_split("train"), galleries)
    drawn = [(f"{name} | {latent.line} | pushes {latent.pushes}", pixels) for (name, latent), pixels in zip(rows, images)]
    plots.image_rows(drawn, files.CLASS_CARDS, "Class cards: each featured class's most frequent latents and the training images they fire on most")
    plots.attribution_heatmap(np.stack([interp.attribution[latent.latent] for _, latent in rows]),
                              [f"{name}: latent {latent.latent}" for name, latent in rows], heads, files.ATTRIBUTION_HEATMAP,
                              "Final-block gate-logit change per unit activation (featured classes' latents)")
