"""`steer`'s artifacts, each with its writer and its one typed reader:

- data/steer/results.parquet: one row per (split, strategy, alpha, draw, class): accuracy, head
  usage and each head's keep rate (`ResultRows`);
- data/steer/headline.parquet: one row per class, the per-class headline (`ClassHeadline`);
- metrics/details/steer.json: curves, headline summaries, nulls and settings (`SteerDetails`).

`report`, `pipeline class` and `pipeline export-pruned` read these through this module only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.steering.headline import ClassHeadline, PolicyEffect
from pipeline.storage import read_dataclass, read_table, rounded, write_dataclass, write_parquet

OMIT = {"omit_none": True}
"""Field metadata: an optional part of the file, absent (not null) when it was not computed."""


# ------------------------------------------------------------------------ the result rows
def results_schema(n_heads: int) -> pa.Schema:
    return pa.schema([
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
    ])


ResultRows = list[dict]
"""Rows of results.parquet as dicts of its columns (a table, read and written whole)."""


def write_results(path: Path | str, rows: ResultRows, n_heads: int) -> None:
    write_parquet(path, pa.Table.from_pylist(rows, schema=results_schema(n_heads)))


def read_results(path: Path | str, split: str | None = None) -> ResultRows:
    """The result rows (of one split, when given), columns checked."""
    required = {name: results_schema(0).field(name).type for name in results_schema(0).names}
    table, _ = read_table(path, required, every_column=True)
    rows = table.to_pylist()
    return [r for r in rows if r["split"] == split] if split is not None else rows


# --------------------------------------------------------------------- the per-block rows
def write_block_rows(path: Path | str, rows: ResultRows, n_heads: int) -> None:
    """data/steer/blocks.parquet (multi-block steering only): results.parquet's rows for each
    gated block's own heads, with a `block` column: one row per (split, block, strategy, alpha,
    draw, class); accuracy is the whole model's, head_usage and keep_h<h> that block's."""
    schema = results_schema(n_heads)
    schema = schema.insert(1, pa.field("block", pa.int32()))
    write_parquet(path, pa.Table.from_pylist(rows, schema=schema))


def read_block_rows(path: Path | str, split: str | None = None) -> ResultRows:
    """blocks.parquet's rows (of one split, when given), columns checked."""
    required = {name: results_schema(0).field(name).type for name in results_schema(0).names}
    table, _ = read_table(path, {**required, "block": pa.int32()}, every_column=True)
    rows = table.to_pylist()
    return [r for r in rows if r["split"] == split] if split is not None else rows


# --------------------------------------------------------------------------- the headline
def write_headline(path: Path | str, headline: list[ClassHeadline], n_heads: int) -> None:
    """One row per class: the alpha chosen on the selection split and the test-split outcome."""
    pair = pa.list_(pa.float64(), 2)
    schema = pa.schema([
        ("class_id", pa.int32()), ("class", pa.string()), ("alpha", pa.float64()),
        ("baseline_accuracy", pa.float64()), ("baseline_usage", pa.float64()), ("baseline_heads", pa.list_(pa.int32())),
        ("accuracy", pa.float64()), ("usage", pa.float64()), ("heads", pa.list_(pa.int32())),
        ("keep_rates", pa.list_(pa.float64(), n_heads)),
        ("accuracy_change_ci", pair), ("usage_change_ci", pair), ("null_usage_change", pair), ("beyond_null", pa.int8()),
    ])
    rows = [{
        "class_id": c.class_id, "class": c.name, "alpha": c.alpha,
        "baseline_accuracy": c.baseline_accuracy, "baseline_usage": c.baseline_usage, "baseline_heads": c.baseline_heads,
        "accuracy": c.accuracy, "usage": c.usage, "heads": c.heads, "keep_rates": c.keep_rates,
        "accuracy_change_ci": c.accuracy_change_ci, "usage_change_ci": c.usage_change_ci,
        "null_usage_change": c.null_usage_change, "beyond_null": c.beyond_null,
    } for c in headline]
    write_parquet(path, pa.Table.from_pylist(rows, schema=schema))


def read_headline(path: Path | str) -> list[ClassHeadline]:
    required = {"class_id": pa.int32(), "class": pa.string(), "alpha": pa.float64(), "usage": pa.float64()}
    table, _ = read_table(path, required, every_column=True)
    pair = lambda v: None if v is None else (float(v[0]), float(v[1]))  # noqa: E731
    try:
        return [ClassHeadline(
            class_id=r["class_id"], name=r["class"], alpha=r["alpha"],
            baseline_accuracy=r["baseline_accuracy"], baseline_usage=r["baseline_usage"], baseline_heads=list(r["baseline_heads"]),
            accuracy=r["accuracy"], usage=r["usage"], heads=list(r["heads"]), keep_rates=list(r["keep_rates"]),
            accuracy_change_ci=pair(r["accuracy_change_ci"]), usage_change_ci=pair(r["usage_change_ci"]),
            null_usage_change=pair(r["null_usage_change"]), beyond_null=int(r["beyond_null"]),
        ) for r in table.to_pylist()]
    except (KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: malformed ({type(exc).__name__}: {exc}); rerun `steer`") from None


# ---------------------------------------------------------------------------- the details
@dataclass
class Baseline:
    accuracy: float
    head_usage: float


@dataclass
class Curve:
    """One strategy's curve over alpha on the test split (a strategy with draws: the mean over
    draws, with the [min, max] over draws in the `_range` lists)."""

    alpha: list[float]
    accuracy: list[float]
    head_usage: list[float]
    accuracy_range: list[list[float]]
    head_usage_range: list[list[float]]
    accuracy_ci: list[list[float]] | None = field(default=None, metadata=OMIT)
    """Bootstrap intervals over test images (absent when `steer.bootstrap` is 0)."""
    head_usage_ci: list[list[float]] | None = field(default=None, metadata=OMIT)
    gflops: list[float] | None = field(default=None, metadata=OMIT)
    """Matmul GFLOPs per image at each point (the final block's usage; earlier blocks as trained)."""


@dataclass
class Flops:
    gflops_dense: float
    gflops_unsteered: float
    final_block_attention_gflops_dense: float


@dataclass
class Settings:
    mode: str
    keep_error: bool
    accuracy_tolerance: float
    select_on: str
    bootstrap: int
    confidence: float
    null_draws: int
    head_index_base: int
    images: dict[str, int]
    """Images per split the sweep ran on."""
    variants: int
    head_path: str
    model_sha256: str | None = None
    """The weights the rows came from: `export-pruned --heads headline` refuses others (None:
    a sweep from before steer recorded it)."""
    blocks: list[int] | None = field(default=None, metadata=OMIT)
    """The steered blocks when `steer.blocks` is not the final block alone (absent otherwise):
    then every usage here, and results.parquet's, is the mean over `gated_blocks`, and head h of
    the g-th gated block is head g * H + h; blocks.parquet holds each block's own."""
    gated_blocks: list[int] | None = field(default=None, metadata=OMIT)


@dataclass
class Policy(PolicyEffect):
    """A policy of choosing a set and an alpha per image, evaluated on the test split."""

    alpha: dict[str, float]
    """Class name -> the alpha the policy uses for it."""


@dataclass
class TopClass:
    name: str = field(metadata={"json": "class"})
    alpha: float
    baseline_accuracy: float
    baseline_usage: float
    accuracy: float
    usage: float
    heads: list[str]
    usage_change_ci: list[float] | None
    accuracy_change_ci: list[float] | None
    beyond_null: int


@dataclass
class NullCount:
    below: int
    above: int


@dataclass
class ClassNullSummary:
    """How many classes' headline usage change lies below / above their random-set null."""

    classes_below: int
    classes_above: int
    classes: int
    per_alpha: dict[str, NullCount]
    """str(alpha) -> the same counts at that alpha for every class."""


@dataclass
class AlphaCounts:
    negative: int
    zero: int
    positive: int


@dataclass
class Headline(Policy):
    """The per-class headline: alphas chosen per class on `selected_on`, reported on test."""

    usage_change: dict[str, float] = field(default_factory=dict)
    mean_gflops_change: float = 0.0
    mean_usage_reduction: float = 0.0
    selected_on: str = "val"
    alpha_counts: AlphaCounts = field(default_factory=lambda: AlphaCounts(0, 0, 0))
    top: list[TopClass] = field(default_factory=list)
    null: ClassNullSummary | None = field(default=None, metadata=OMIT)


@dataclass
class DrawSpread:
    """A policy with seeded draws, selected and reported once per draw: each draw's mean changes."""

    usage_change: list[float]
    accuracy_change: list[float]


@dataclass
class ControlPolicy(Policy):
    """A control's per-class policy, built as the headline is: alphas chosen per class on
    `selected_on`, reported on test against the control's null. For a control with draws, the
    fields are draw 0's, and `draws` has every draw's mean changes."""

    selected_on: str = "val"
    null: ClassNullSummary | None = field(default=None, metadata=OMIT)
    draws: DrawSpread | None = field(default=None, metadata=OMIT)


@dataclass
class NullPoint:
    """The global set's usage change at one alpha against random sets of its size."""

    usage_change: float
    null_low: float
    null_high: float
    side: int


@dataclass
class DoseResponse:
    """One strategy's curve read off the test split (descriptive: nothing selected): the largest
    final-block usage reduction whose accuracy is at least the unsteered accuracy minus the
    tolerance, the smallest |alpha| that reaches it, and how far usage still moves over the
    grid's last step (near 0: the curve has flattened)."""

    usage_reduction: float
    alpha: float
    accuracy_change: float
    last_step_usage_change: float
    """Usage at the largest alpha minus usage at the next largest."""


@dataclass
class SteerDetails:
    baseline: Baseline
    strategies: dict[str, Curve]
    flops: Flops
    settings: Settings
    per_class_headline: Headline | None = field(default=None, metadata=OMIT)
    predicted_class_policy: Policy | None = field(default=None, metadata=OMIT)
    global_null: dict[str, NullPoint] | None = field(default=None, metadata=OMIT)
    dose_response: dict[str, DoseResponse] | None = field(default=None, metadata=OMIT)
    controls: dict[str, ControlPolicy] | None = field(default=None, metadata=OMIT)
    """Per control strategy (`STRATEGIES[name].is_control`) among `steer.strategies`: its policy."""

    def metrics(self) -> dict[str, float | int]:
        """metrics/steer.json: the headline's three scalars (short names keep `dvc exp show`
        legible at 120 columns; docs/EXPERIMENTS.md explains them); empty without a headline.
        A multi-block sweep adds `gflops_drop`, the share of the unsteered model's GFLOPs the
        headline saves, to set beside the ceiling's `blocks_gflops_drop` (a final-block run keeps
        its three, so its file is unchanged)."""
        h = self.per_class_headline
        if h is None:
            return {}
        out = {"usage_drop": 0.0 - h.mean_usage_change, "acc_change": h.mean_accuracy_change, "fewer_heads": h.classes_with_reduction}
        if self.settings.blocks is not None:
            out["gflops_drop"] = 0.0 - h.mean_gflops_change / self.flops.gflops_unsteered
        return out


# ------------------------------------------------------------------- the data of `dvc plots`
def curve_rows(curves: dict[str, Curve], key: str) -> list[dict]:
    """The paper's Figures 2 and 3 for `dvc plots`: one row per (alpha, strategy) of `key`
    (`accuracy` or `head_usage`), with the spread over draws as a band."""
    return [
        {"alpha": a, "series": name, key: rounded(value), "low": rounded(band[0]), "high": rounded(band[1])}
        for name, curve in curves.items()
        for a, value, band in zip(curve.alpha, getattr(curve, key), getattr(curve, f"{key}_range"))
    ]


def class_usage_rows(headline: list[ClassHeadline]) -> list[dict]:
    """Per class: final-block usage unsteered and at its headline alpha."""
    return [{"class": c.name, "baseline_usage": c.baseline_usage, "steered_usage": c.usage, "alpha": c.alpha} for c in headline]


def write_details(path: Path | str, details: SteerDetails) -> None:
    write_dataclass(path, details)


def read_details(path: Path | str) -> SteerDetails:
    return read_dataclass(SteerDetails, path, rerun="steer")
