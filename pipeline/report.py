"""metrics/report.md: the page a person opens first after `dvc repro`."""

from __future__ import annotations

from typing import Any

from pipeline.gated_vit import ModelConfig
from pipeline.params import Params
from pipeline.steering import ClassHeadline
from pipeline.strategies import STRATEGIES

# What the paper reports (Lee and Har, AAAI 2026 student abstract; ViT-S/16, CIFAR-100).
PAPER_CLASSES = {
    "bowl": {"accuracy": (0.76, 0.82), "usage": (0.72, 0.33), "heads": "h2, h5"},
    "pine_tree": {"accuracy": (0.79, 0.84), "usage": (0.93, 0.35), "heads": "h2, h3"},
}
PAPER_OVERLAP = 0.1641
PAPER_SAE_MSE = 0.0228


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _heads(heads: list[int], names: list[str]) -> str:
    return ", ".join(names[h] for h in heads) or "none"


def _row(c: ClassHeadline, names: list[str]) -> str:
    return (
        f"| {c.name} | {_pct(c.baseline_accuracy)} / {c.baseline_usage:.2f} ({_heads(c.baseline_heads, names)}) "
        f"| {_pct(c.accuracy)} / {c.usage:.2f} ({_heads(c.heads, names)}) | {c.alpha:+g} |"
    )


def render_report(
    params: Params,
    config: ModelConfig,
    stats: dict[str, Any],
    steer: dict[str, Any],
    headline: list[ClassHeadline],
    head_names: list[str],
    finetune: dict[str, Any],
    sae: dict[str, Any],
) -> str:
    sp, shape = params.steer, config.shape
    paper_scale = shape.embed_dim == 384 and shape.depth == 12 and params.data.source != "synthetic"
    drawn = [s for s in sp.strategies if STRATEGIES[s].uses_draws]
    draws = f" ({sp.random_draws} {'/'.join(drawn)} draws)" if drawn else ""
    lines = [
        "# Steering SAE latents to control dynamic head pruning: run report",
        "",
        "Reproduces Lee and Har, *Steering Sparse Autoencoder Latents to Control Dynamic Head Pruning in",
        "Vision Transformers* (AAAI 2026 student abstract) with this pipeline. All numbers below are",
        "computed by this run from its own artifacts (`metrics/*.json`, `data/steer/results.parquet`).",
        f"Heads are numbered from {sp.head_index_base} (h{sp.head_index_base} .. h{shape.num_heads - 1 + sp.head_index_base}).",
        "",
        "## Configuration",
        "",
        "| part | setting |",
        "|---|---|",
        f"| data | `{params.data.source}`, {len(config.class_names)} classes |",
        f"| model | `{config.timm_name}` img {shape.img_size}, patch {shape.patch_size}, width {shape.embed_dim}, "
        f"depth {shape.depth}, {shape.num_heads} heads, gated from block {config.keep_layers}; "
        f"{'pretrained' if params.model.pretrained else 'from checkpoint' if params.model.checkpoint else 'from scratch'} |",
        f"| fine-tuning | {params.finetune.epochs} epochs, head target {params.finetune.head_target}, weight {params.finetune.head_weight}, tau {params.finetune.tau} |",
        f"| SAE | TopK, {sae.get('n_latents')} latents, k = {sae.get('k')}, {params.sae.epochs} epochs |",
        f"| statistics | top-{params.stats.top_k} most frequent latents (train split) |",
        f"| steering | mode `{sp.mode}`, keep_error {sp.keep_error}, alphas {sorted(set(sp.alphas) | {0.0})}, "
        f"strategies {', '.join(sp.strategies)}{draws}, tolerance {sp.accuracy_tolerance} |",
        "",
        "## Model and SAE",
        "",
        f"- Test accuracy {_pct(finetune['test_accuracy'])}; final-block head usage {finetune['head_usage']:.3f}; "
        f"per block {', '.join(f'{u:.2f}' for u in finetune['head_usage_per_block'])}.",
        f"- SAE on the test split: FVU {sae['test']['fvu']:.4f}, MSE {sae['test']['mse']:.4g}, L0 {sae['test']['l0']:.1f}, "
        f"dead fraction {sae['test']['dead_fraction']:.3f} (paper: MSE {PAPER_SAE_MSE}, definition not given).",
        f"- Latent overlap between the global top set and each class's (mean over classes): "
        f"|A ∩ B| / K = {stats['overlap_global_vs_class']:.4f}, Jaccard = {stats['jaccard_global_vs_class']:.4f} "
        f"(paper: {PAPER_OVERLAP}, formula not given). Alive latents: {stats['alive_latents']}.",
        "",
        "## Per-class steering (headline)",
        "",
        "Rule: per class, the alpha with the lowest final-block head usage whose accuracy is at least the",
        f"unsteered accuracy minus {sp.accuracy_tolerance} (`steer.accuracy_tolerance`); the per-class strategy",
        "uses the true class's latent set (an oracle analysis, as in the paper). Kept heads: those kept by",
        "a majority of the class's test images.",
        "",
    ]
    if headline:
        reduction = steer["per_class_headline"]
        lines += [
            f"Mean over {len(headline)} classes: usage reduction {reduction['mean_usage_reduction']:.3f}, "
            f"accuracy change {100 * reduction['mean_accuracy_change']:+.1f} points; "
            f"{reduction['classes_with_reduction']} classes use fewer heads at their selected alpha.",
            "",
            "| class | baseline acc / usage (heads) | steered acc / usage (heads) | alpha |",
            "|---|---|---|---|",
        ]
        ranked = sorted(headline, key=lambda c: (-c.usage_reduction, c.class_id))
        lines += [_row(c, head_names) for c in ranked[: sp.top_classes]]
        named = [c for c in headline if c.name in PAPER_CLASSES and c not in ranked[: sp.top_classes]]
        lines += [_row(c, head_names) for c in named]
    else:
        lines.append("(per_class is not among `steer.strategies`: no headline.)")
    base = steer["baseline"]
    lines += [
        "",
        "## Strategies (all test images)",
        "",
        f"Unsteered: accuracy {_pct(base['accuracy'])}, final-block head usage {base['head_usage']:.3f}.",
        "",
        "| strategy | alpha | accuracy | head usage |",
        "|---|---|---|---|",
    ]
    for strategy, curve in steer["strategies"].items():
        for a, acc, usage in zip(curve["alpha"], curve["accuracy"], curve["head_usage"]):
            lines.append(f"| {strategy} | {a:+g} | {_pct(acc)} | {usage:.3f} |")
    ours = {c.name: c for c in headline}
    lines += [
        "",
        "## Beside the paper",
        "",
        "| quantity | paper (ViT-S/16, CIFAR-100) | this run |",
        "|---|---|---|",
    ]
    for name, ref in PAPER_CLASSES.items():
        mine = ours.get(name)
        got = (f"{_pct(mine.baseline_accuracy)} -> {_pct(mine.accuracy)}, usage {mine.baseline_usage:.2f} -> {mine.usage:.2f} "
               f"({_heads(mine.heads, head_names)})") if mine else "class not in this data set"
        lines.append(
            f"| {name} | {_pct(ref['accuracy'][0])} -> {_pct(ref['accuracy'][1])}, usage {ref['usage'][0]} -> {ref['usage'][1]} "
            f"({ref['heads']}) | {got} |"
        )
    lines += [
        f"| overlap global vs class | {PAPER_OVERLAP} | {stats['overlap_global_vs_class']:.4f} (\\|A ∩ B\\| / K), {stats['jaccard_global_vs_class']:.4f} (Jaccard) |",
        "",
        ("This run has the paper's scale (ViT-S/16 width 384, 12 blocks, real data): the numbers are quantitatively comparable."
         if paper_scale else
         "This run is smaller than the paper's (model, data or both): compare signs and shapes of the curves, not values. "
         "The direction in which amplifying class latents moves head usage is a property of the trained decision network "
         "and may be the reverse of the paper's at small scale."),
        "",
        "## Figures",
        "",
        "![accuracy and head usage vs alpha](plots/steer_curves.png)",
        "",
    ]
    if headline:
        lines += [
            "![per-class head keep rates, unsteered and at the headline alpha](plots/head_keep_heatmap.png)",
            "",
            "![per-class head usage, unsteered vs steered](plots/steer_class_usage.png)",
            "",
        ]
    lines += [
        "![class-by-class overlap of the top latent sets](plots/overlap_heatmap.png)",
        "",
        "![firing frequency of the SAE latents](plots/firing_frequency.png)",
        "",
    ]
    return "\n".join(lines)
