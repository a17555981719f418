"""Results across training runs: how stable is a finding? (`pipeline summarize`)

Reads finished DVC experiments (`dvc exp show --json` for their params and headline metrics,
`git show` of each experiment commit for metrics/details/steer.json) and summarises:
- each headline quantity's mean, standard deviation, min and max across runs;
- per strategy, the sign agreement: the fraction of runs in which amplifying (the largest
  alpha) lowers final-block head usage below the unsteered usage;
- per class, how often its selected alpha has the sign it has most often, and how often its
  usage change at that alpha is negative (fewer heads).
One run cannot support a claim about the direction of an effect; this table says how many
runs agree.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

HEADLINE = ("test_accuracy", "head_usage", "fvu", "l0", "dead_fraction", "overlap", "jaccard",
            "usage_drop", "acc_change", "fewer_heads")
STEER_DETAILS = "metrics/details/steer.json"


@dataclass
class RunRecord:
    """One finished experiment: its name, flat params, headline metrics and steering details."""

    name: str
    params: dict[str, Any]
    metrics: dict[str, float]
    steer: dict[str, Any] = field(default_factory=dict)
    rev: str = ""
    """The experiment's commit, to read its other files from (`git show REV:PATH`)."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys (`{"a": {"b": 1}}` -> `{"a.b": 1}`)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def git_json(rev: str, path: str, repo: Path) -> dict[str, Any]:
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        return {}
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        return {}


def collect(pattern: str, repo: Path = Path(".")) -> list[RunRecord]:
    """The finished experiments whose name matches `pattern` (a regular expression)."""
    # -A: experiments of every commit, not only of HEAD (a sweep queued before the last commit
    # is still a sweep of its configuration)
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json", "-A"], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise PipelineError(f"`dvc exp show --json` failed: {result.stderr.strip()[-300:]}")
    regex = re.compile(pattern)
    runs = []
    for baseline in json.loads(result.stdout):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                name = rev.get("name") or experiment.get("name") or ""
                data = rev.get("data") or {}
                if not regex.search(name) or not data.get("metrics"):
                    continue
                params = {k: v for f in (data.get("params") or {}).values() for k, v in flatten(f.get("data") or {}).items()}
                metrics = {k: v for f in data["metrics"].values() for k, v in flatten(f.get("data") or {}).items()}
                runs.append(RunRecord(name, params, metrics, git_json(rev.get("rev", ""), STEER_DETAILS, repo), rev.get("rev", "")))
    return sorted(runs, key=lambda r: r.name)


@dataclass
class Spread:
    n: int
    mean: float
    std: float
    """Sample standard deviation (n - 1)."""
    min: float
    max: float


def spread(values: list[float]) -> Spread:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return Spread(n, mean, std, min(values), max(values))


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def summarize(runs: list[RunRecord]) -> dict[str, Any]:
    """The summary of at least two comparable runs (see the module docstring)."""
    if len(runs) < 2:
        raise PipelineError(f"summarize needs at least two finished experiments to compare, found {len(runs)}")
    headline = {}
    for key in HEADLINE:
        values = [float(r.metrics[key]) for r in runs if isinstance(r.metrics.get(key), (int, float))]
        if values:
            headline[key] = spread(values).__dict__
    strategies: dict[str, dict[str, Any]] = {}
    for run in runs:
        for name, curve in (run.steer.get("strategies") or {}).items():
            alphas = curve["alpha"]
            top, base = alphas.index(max(alphas)), alphas.index(0.0)
            change = curve["head_usage"][top] - curve["head_usage"][base]
            entry = strategies.setdefault(name, {"alpha": max(alphas), "changes": []})
            entry["changes"].append(change)
    for entry in strategies.values():
        entry["lowers_usage"] = sum(c < 0 for c in entry["changes"]) / len(entry["changes"])
        entry["runs"] = len(entry["changes"])
    classes: dict[str, dict[str, Any]] = {}
    for run in runs:
        chosen = (run.steer.get("per_class_headline") or {})
        for name, alpha in (chosen.get("alpha") or {}).items():
            entry = classes.setdefault(name, {"signs": [], "changes": []})
            entry["signs"].append(_sign(alpha))
            entry["changes"].append((chosen.get("usage_change") or {}).get(name))
    for entry in classes.values():
        sign, count = Counter(entry["signs"]).most_common(1)[0]
        entry["modal_sign"], entry["sign_agreement"] = sign, count / len(entry["signs"])
        changes = [c for c in entry["changes"] if c is not None]
        entry["fewer_heads"] = sum(c < 0 for c in changes) / len(changes) if changes else float("nan")
    return {"runs": [r.name for r in runs], "headline": headline, "strategies": strategies, "classes": classes}


def render_markdown(summary: dict[str, Any]) -> str:
    runs = summary["runs"]
    lines = [f"# Across {len(runs)} runs: {', '.join(runs)}", "", "| quantity | mean | sd | min | max |", "|---|---|---|---|---|"]
    for key, s in summary["headline"].items():
        lines.append(f"| {key} | {s['mean']:.4g} | {s['std']:.2g} | {s['min']:.4g} | {s['max']:.4g} |")
    lines += ["", "Sign agreement: in how many runs amplifying a strategy's latents (the largest alpha) lowers "
              "final-block head usage.", "", "| strategy | alpha | runs with lower usage | usage change per run |", "|---|---|---|---|"]
    for name, entry in summary["strategies"].items():
        changes = ", ".join(f"{c:+.3f}" for c in entry["changes"])
        lowered = round(entry["lowers_usage"] * entry["runs"])
        lines.append(f"| {name} | {entry['alpha']:+g} | {lowered} of {entry['runs']} | {changes} |")
    if summary["classes"]:
        agree = [e["sign_agreement"] for e in summary["classes"].values()]
        fewer = [e["fewer_heads"] for e in summary["classes"].values() if e["fewer_heads"] == e["fewer_heads"]]
        lines += ["", f"Per class ({len(agree)} classes): the selected alpha has its most common sign in "
                  f"{100 * sum(agree) / len(agree):.0f}% of runs on average; a class uses fewer heads at its selected "
                  f"alpha in {100 * sum(fewer) / max(len(fewer), 1):.0f}% of runs on average.", "",
                  "| class | most common alpha sign | sign agreement | runs with fewer heads |", "|---|---|---|---|"]
        for name, e in sorted(summary["classes"].items()):
            lines.append(f"| {name} | {'+-0'[[1, -1, 0].index(e['modal_sign'])]} | {100 * e['sign_agreement']:.0f}% | "
                         f"{100 * e['fewer_heads']:.0f}% |")
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], runs: list[RunRecord], out_dir: Path) -> None:
    """summary.md, summary.json and summary.png (usage vs alpha per strategy, one line per run)."""
    from pipeline.report import plots
    from pipeline.storage import rounded, write_json, write_text

    write_text(out_dir / "summary.md", render_markdown(summary))
    write_json(out_dir / "summary.json", rounded(summary))
    curves = {run.name: run.steer.get("strategies") or {} for run in runs}
    plots.runs_usage_curves(curves, out_dir / "summary.png")
