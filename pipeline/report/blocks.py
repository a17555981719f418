"""The report's view across blocks: each gated block's head usage unsteered, at the per-class
steering headline and (when `ceiling` searched several blocks) at the ceiling, and the model's
GFLOPs per image for each.

For a final-block sweep only the final block moves (the earlier blocks' usage is finetune's);
for a multi-block sweep (`steer.blocks`), each block's usage comes from data/steer/blocks.parquet
at each class's headline alpha. Both are class means over the test split, as the headline's
mean usage change is, so the blocks' mean change equals that headline (checked here).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.steering.costs import LatencyDetails
from pipeline.steering.results import SteerDetails
from pipeline.steering.strategies import PER_CLASS


@dataclass(frozen=True)
class BlockUsage:
    gated: list[int]
    """The gated blocks, in order."""
    steered: list[int]
    """The blocks steering changed directly (`steer.blocks`)."""
    unsteered: list[float]
    """Per gated block: class-mean head usage on test, unsteered."""
    headline: list[float] | None
    """Per gated block: class-mean head usage on test at each class's headline alpha (None:
    no per-class headline)."""
    gflops_unsteered: float
    gflops_headline_change: float | None
    accuracy_change: float | None
    """The headline's mean accuracy change (test)."""
    attention_gflops_per_block: float
    """One gated block's attention with every head kept (the blocks share one shape)."""

    @property
    def headline_change(self) -> list[float] | None:
        return None if self.headline is None else [h - u for h, u in zip(self.headline, self.unsteered)]


def block_usage(steer: SteerDetails, rows: list[dict], usage_per_block: list[float], keep_layers: int) -> BlockUsage:
    """The view from steer's details and its test-split rows: blocks.parquet's for a multi-block
    sweep, results.parquet's (the final block's) otherwise; `usage_per_block` is finetune's
    (every block, on test), the usage of the blocks a final-block sweep leaves alone."""
    depth = len(usage_per_block)
    gated = list(range(keep_layers, depth))
    headline = steer.per_class_headline
    multi = steer.settings.blocks is not None
    moving = gated if multi else [depth - 1]
    if not multi:
        rows = [{**r, "block": depth - 1} for r in rows]
    rows = [r for r in rows if r["strategy"] == PER_CLASS and r["draw"] == 0 and r["n"]]

    def class_mean(block: int, alpha_of) -> float:
        usage = [r["head_usage"] for r in rows if r["block"] == block and r["alpha"] == alpha_of(r["class"])]
        return sum(usage) / len(usage)

    unsteered = [class_mean(b, lambda c: 0.0) if b in moving else usage_per_block[b] for b in gated]
    at_headline = None
    if headline is not None:
        at_headline = [class_mean(b, headline.alpha.get) if b in moving else usage_per_block[b] for b in gated]
        mean_change = sum(at_headline[gated.index(b)] - unsteered[gated.index(b)] for b in moving) / len(moving)
        # the rows' rates and the headline's policy are summed in different orders (and the
        # headline from float32 per-image usage): equal to float rounding, not bit for bit
        if abs(mean_change - headline.mean_usage_change) > 1e-6:
            raise ValueError(f"the per-block usage changes average {mean_change:+.9f}, the headline says "
                             f"{headline.mean_usage_change:+.9f}: the files come from different sweeps; rerun steer")
    return BlockUsage(gated=gated, steered=steer.settings.blocks or [depth - 1], unsteered=unsteered, headline=at_headline,
                      gflops_unsteered=steer.flops.gflops_unsteered,
                      gflops_headline_change=None if headline is None else headline.mean_gflops_change,
                      accuracy_change=None if headline is None else headline.mean_accuracy_change,
                      attention_gflops_per_block=steer.flops.final_block_attention_gflops_dense / len(moving))


def render_blocks(view: BlockUsage, ceiling_rows: list[tuple[str, list[float], float, float]] | None = None) -> list[str]:
    """The report's section: a table of usage per gated block and the GFLOPs change.
    `ceiling_rows`: (name, usage per gated block, GFLOPs change, accuracy change) of ceiling
    configurations to show beside steering."""
    names = [f"b{b}" for b in view.gated]
    steered = ", ".join(f"b{b}" for b in view.steered)
    lines = [
        "## Across blocks",
        "",
        f"Steered blocks: {steered} (`steer.blocks`); gated blocks {', '.join(names)}. Head usage per gated block on the test "
        "split (class means), and the whole model's matmul GFLOPs per image; a steered block changes every later block's input "
        "and so its gates too.",
        "",
        "| | " + " | ".join(names) + " | GFLOPs change per image | accuracy change (points) |",
        "|---|" + "---|" * len(names) + "---|---|",
        "| unsteered | " + " | ".join(f"{u:.3f}" for u in view.unsteered) + f" | {view.gflops_unsteered:.4g} (the model) | - |",
    ]
    if view.headline is not None and view.gflops_headline_change is not None:
        change = view.gflops_headline_change
        lines.append("| per-class steering (headline alphas) | " + " | ".join(f"{u:.3f}" for u in view.headline)
                     + f" | {change:+.4g} ({100 * change / view.gflops_unsteered:+.1f}%) | {100 * view.accuracy_change:+.1f} |")
    for name, usage, gflops_change, accuracy_change in ceiling_rows or []:
        lines.append(f"| {name} | " + " | ".join(f"{u:.3f}" for u in usage)
                     + f" | {gflops_change:+.4g} ({100 * gflops_change / view.gflops_unsteered:+.1f}%) | {100 * accuracy_change:+.1f} |")
    lines += ["", "Steering: alphas chosen per class on the selection split (`steer.select_on`); the ceiling's patterns alike; "
              "all reported on test. GFLOPs changes are class means, like the usage."]
    lines += ["", f"One gated block's attention with every head kept: {view.attention_gflops_per_block:.4g} GFLOPs per image "
              f"({100 * view.attention_gflops_per_block / view.gflops_unsteered:.1f}% of the unsteered model).",
              "", "![head usage per gated block](plots/block_usage.png)", ""]
    return lines


POLICY_NAMES = {
    "unsteered": "unsteered (own gates)",
    "per_class": "per-class steering, true class (oracle)",
    "per_class_predicted": "per-class steering, predicted class (deployable; + the unsteered pass)",
    "ceiling": "ceiling: the class's fixed patterns (oracle)",
}


def render_compute(latency: LatencyDetails) -> list[str]:
    """The report's section on what each policy costs as deployed (stage `latency`)."""
    settings = latency.settings
    base = latency.policies["unsteered"]
    sizes = [str(b) for b in settings.batch_sizes]
    timed = all(p.latency_ms for p in latency.policies.values())
    blocks = sorted(base.usage, key=int)
    header = "| policy | accuracy | " + " | ".join(f"usage b{b}" for b in blocks) + " | GFLOPs per image | with steering's own work |"
    rule = "|---|---|" + "---|" * len(blocks) + "---|---|"
    if timed:
        header += "".join(f" ms per image, batch {b} |" for b in sizes)
        rule += "---|" * len(sizes)
    lines = [
        "## Compute in time",
        "",
        f"Each policy run as a deployed model runs it, block by block on the {settings.head_path} path (stage `latency`, "
        f"`pipeline.steering.deploy`), on {settings.images} test images evenly spaced over the split; steered blocks "
        f"{', '.join(f'b{b}' for b in settings.steered_blocks)}; the alphas and patterns are the ones chosen on the selection "
        "split. GFLOPs per image count the kept heads; \"with steering's own work\" adds the SAE's encoder and decoder on one "
        "CLS row per steered block and, for the predicted-class policy, the unsteered pass that predicts the class.",
        "",
        header,
        rule,
    ]
    for name, p in sorted(latency.policies.items(), key=lambda item: list(POLICY_NAMES).index(item[0])
                          if item[0] in POLICY_NAMES else len(POLICY_NAMES)):
        row = (f"| {POLICY_NAMES.get(name, name)} | {100 * p.accuracy:.1f}% | " + " | ".join(f"{p.usage[b]:.3f}" for b in blocks)
               + f" | {p.gflops:.4g} ({100 * (p.gflops / base.gflops - 1):+.1f}%) | {p.gflops_total:.4g} "
               f"({100 * (p.gflops_total / base.gflops - 1):+.1f}%) |")
        if timed:
            row += "".join(f" {p.latency_ms[b].image_ms:.3f} ({100 * (p.latency_ms[b].image_ms / base.latency_ms[b].image_ms - 1):+.0f}%) |"
                           for b in sizes)
        lines.append(row)
    lines.append("")
    if timed:
        lines.append(f"Times: median of {settings.rounds} rounds (the policies alternate within a round) on {settings.threads} CPU "
                     f"thread(s) of {settings.cpu or 'an unrecorded CPU'}, torch {settings.torch_version}; they vary from run to run "
                     "and machine to machine, unlike every other number on this page.")
    else:
        lines.append("Times are not measured in this run (`latency.measure: false`, the default, which keeps the run's outputs "
                     "byte-identical); `dvc exp run -S latency.measure=true` adds them.")
    return lines
