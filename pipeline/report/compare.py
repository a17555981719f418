"""Which SAE steers best? One row per finished experiment (`pipeline compare`).

Reads the experiments `pipeline.report.summary.collect` finds and, from each experiment's
commit, the details files of `train_sae`, `interpret`, `steer`, `ceiling` and `report`. A row:
the params that differ between the runs, the SAE's test FVU, L0 and dead fraction, its class
purity beside the random-direction and PCA baselines of the same run, the per-class steering
headline (usage change with its interval, accuracy change) and its share of the run's
ceiling, the class-direction control's share, and how often the predicted gate-logit shift has
the sign of the measured keep-rate change (per-class sets). Nothing is recomputed: every number
is the run's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.report.summary import RunRecord, git_json

DETAILS = {
    "sae": "metrics/details/sae.json",
    "interpret": "metrics/details/interpret.json",
    "ceiling": "metrics/details/ceiling.json",
    "report": "metrics/details/report.json",
}
IGNORED_PARAMS = ("data.path",)
"""Params that differ between machines, not between settings."""


@dataclass
class ComparisonRow:
    name: str
    settings: dict[str, Any]
    """The params whose values differ between the compared runs."""
    fvu: float | None
    l0: float | None
    dead_fraction: float | None
    purity: float | None
    purity_random: float | None
    purity_pca: float | None
    usage_change: float | None
    usage_change_ci: list[float] | None
    accuracy_change: float | None
    ceiling_usage_change: float | None
    share_of_ceiling: float | None
    class_direction_share: float | None
    sign_agreement: float | None


def _get(tree: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _share(change: float | None, ceiling: float | None) -> float | None:
    return change / ceiling if change is not None and ceiling is not None and ceiling < 0 else None


def differing_params(runs: list[RunRecord]) -> list[str]:
    keys = sorted({k for run in runs for k in run.params} - set(IGNORED_PARAMS))
    return [k for k in keys if len({repr(run.params.get(k)) for run in runs}) > 1]


def compare(runs: list[RunRecord], repo: Path = Path(".")) -> list[ComparisonRow]:
    if not runs:
        raise PipelineError("compare found no finished experiment matching the pattern")
    keys = differing_params(runs)
    rows = []
    for run in runs:
        files = {name: git_json(run.rev, path, repo) for name, path in DETAILS.items()}
        headline = run.steer.get("per_class_headline") or {}
        ceiling = _get(files["ceiling"], "summary", "mean_usage_change")
        class_direction = _get(run.steer, "controls", "class_direction", "mean_usage_change")
        rows.append(ComparisonRow(
            name=run.name,
            settings={k: run.params.get(k) for k in keys},
            fvu=_get(files["sae"], "test", "fvu"),
            l0=_get(files["sae"], "test", "l0"),
            dead_fraction=_get(files["sae"], "test", "dead_fraction"),
            purity=run.metrics.get("purity"),
            purity_random=_get(files["interpret"], "purity", "random", "mean"),
            purity_pca=_get(files["interpret"], "purity", "pca", "mean"),
            usage_change=headline.get("mean_usage_change"),
            usage_change_ci=headline.get("mean_usage_change_ci"),
            accuracy_change=headline.get("mean_accuracy_change"),
            ceiling_usage_change=ceiling,
            share_of_ceiling=_share(headline.get("mean_usage_change"), ceiling),
            class_direction_share=_share(class_direction, ceiling),
            sign_agreement=_get(files["report"], "shift_vs_keep", "per_class", "sign_agreement"),
        ))
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def render_markdown(rows: list[ComparisonRow]) -> str:
    keys = list(rows[0].settings) if rows else []
    head = ["run", *keys, "test FVU", "L0", "dead", "purity (random / PCA)", "per-class usage change", "accuracy (points)",
            "share of the ceiling", "class direction's share", "predicted sign agrees"]
    lines = ["# Which SAE steers best", "",
             "One row per experiment, every number from the run's own files (`pipeline compare`). Purity: the mean class "
             "purity of the SAE's alive latents, beside random unit directions and PCA directions fired at the same rates. "
             "Usage change: the per-class steering headline (alphas chosen on `steer.select_on`, reported on test) with its "
             "95% interval; shares are of the same run's ceiling. Predicted sign agrees: of the (class, alpha, head) points "
             "whose keep rate moved under per-class steering, the share whose change has the sign the SAE's attribution "
             "predicts.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ci = f" [{r.usage_change_ci[0]:+.3f}, {r.usage_change_ci[1]:+.3f}]" if r.usage_change_ci and None not in r.usage_change_ci else ""
        cells = [r.name, *(str(r.settings[k]) for k in keys), _fmt(r.fvu, ".4f"), _fmt(r.l0, ".1f"), _fmt(r.dead_fraction, ".2f"),
                 f"{_fmt(r.purity, '.3f')} ({_fmt(r.purity_random, '.3f')} / {_fmt(r.purity_pca, '.3f')})",
                 f"{_fmt(r.usage_change, '+.3f')}{ci}", _fmt(None if r.accuracy_change is None else 100 * r.accuracy_change, "+.1f"),
                 _percent(r.share_of_ceiling), _percent(r.class_direction_share), _percent(r.sign_agreement)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(rows: list[ComparisonRow], out_dir: Path) -> None:
    from pipeline.storage import rounded, write_json, write_text

    write_text(out_dir / "comparison.md", render_markdown(rows))
    write_json(out_dir / "comparison.json", rounded([asdict(r) for r in rows]))
