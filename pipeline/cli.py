"""The `pipeline` command: one Typer command per DVC stage, plus `validate`.

Commands only parse parameters, call a stage's `run` and map failures to exit codes:
2 for invalid parameters (nothing is written), 1 for other user-facing errors. Neither prints
a traceback; `--debug` does.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import typer

from pipeline.errors import ParamsError, PipelineError
from pipeline.params.file import Params, load_params

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Steering SAE latents to control dynamic head pruning in ViTs: the DVC stages.",
)

ParamsOption = typer.Option(Path("params.yaml"), "--params", "-p", help="Parameter file (params.yaml layout).")
DebugOption = typer.Option(False, "--debug", help="Show tracebacks.")


def _setup_logging() -> None:
    level = os.environ.get("PIPELINE_LOG", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _check_registered(params: Params, path: Path) -> None:
    """Names that refer to a registry rather than a fixed list (steering strategies). Checked
    here, not in pipeline/params/, so that no stage depends on the registry's code through its params."""
    from pipeline.steering.strategies import check_strategies

    check_strategies(params.steer.strategies, source=f"invalid parameters in {path}: ")


def _load(path: Path) -> Params:
    try:
        params = load_params(path)
        _check_registered(params, path)
        return params
    except ParamsError as exc:
        _fail(str(exc), 2)
        raise  # unreachable


STAGE_SECTIONS: dict[str, tuple[str, ...] | None] = {
    "download": ("data",),
    "finetune": ("model", "finetune"),
    "extract": ("extract",),
    "train_sae": ("sae",),
    "train_sae_block": ("sae",),
    "latent_stats": ("stats",),
    "latent_stats_block": ("stats",),
    "interpret": ("interpret",),
    "steer": ("steer",),
    "ceiling": ("ceiling", "steer"),
    "latency": ("latency",),
    "report": None,
    "explorer": ("interpret",),
}
"""The params sections each stage's `run` takes, in order (None: the whole file). A stage
imports only its sections' modules, so editing another section's code does not rerun it;
dvc.yaml lists the same sections (tests/test_dvc_workflow.py checks both)."""


def call_stage(name: str, params: Params, *args: Any) -> None:
    """Run one stage's `run` on its sections of `params` (then `args`: a per-block stage's block)."""
    stage = importlib.import_module(f"pipeline.stages.{name}")
    sections = STAGE_SECTIONS[name]
    stage.run(params) if sections is None else stage.run(*(getattr(params, s) for s in sections), *args)


PER_BLOCK_STAGES = ("train_sae_block", "latent_stats_block")
"""Stages dvc.yaml generates once per block of `extract.layers` (`foreach`); run with the block."""


def call_stages(params: Params) -> None:
    """Every stage in dvc.yaml's order, in this process (the per-block ones once per block of
    `extract.layers`): what `dvc repro` runs, for tests and notebooks."""
    for name in STAGE_SECTIONS:
        for args in ([(b,) for b in params.extract.layers] if name in PER_BLOCK_STAGES else [()]):
            call_stage(name, params, *args)


def _run_stage(module: str, params_path: Path, debug: bool, *args: Any) -> None:
    _setup_logging()
    params = _load(params_path)
    try:
        call_stage(module, params, *args)
    except (PipelineError, ParamsError) as exc:
        if debug:
            raise
        _fail(str(exc), 2 if isinstance(exc, ParamsError) else 1)


@app.command()
def validate(params: Path = ParamsOption) -> None:
    """Check a parameter file without running anything."""
    _load(params)
    typer.echo(f"{params}: valid")


@app.command("params-doc")
def params_doc() -> None:
    """Print every parameter with its type, default and meaning (Markdown)."""
    from pipeline.params.file import describe_params

    typer.echo(describe_params())


@app.command()
def download(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """Write the canonical data set data/dataset/{train,test}.parquet from `data.source`."""
    _run_stage("download", params, debug)


@app.command()
def finetune(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """Train the head-gated ViT; writes models/vit/ and metrics/finetune.json."""
    _run_stage("finetune", params, debug)


@app.command()
def extract(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """Store the final block's CLS input and gate decisions of every image in Parquet."""
    _run_stage("extract", params, debug)


@app.command("train-sae")
def train_sae(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """Train the TopK SAE on the extracted embeddings; writes models/sae/."""
    _run_stage("train_sae", params, debug)


@app.command("train-sae-block")
def train_sae_block(block: int = typer.Argument(..., help="A block listed in extract.layers."), params: Path = ParamsOption,
                    debug: bool = DebugOption) -> None:
    """Train the SAE of an earlier block on its stored CLS inputs; writes models/sae_blocks/block<b>/."""
    _run_stage("train_sae_block", params, debug, block)


@app.command("latent-stats-block")
def latent_stats_block(block: int = typer.Argument(..., help="A block listed in extract.layers."), params: Path = ParamsOption,
                       debug: bool = DebugOption) -> None:
    """Firing statistics and top sets of an earlier block's SAE; writes data/stats_blocks/block<b>/."""
    _run_stage("latent_stats_block", params, debug, block)


@app.command()
def latency(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """GFLOPs (and, with latency.measure, CPU time) of the steering headline and the ceiling as deployed models."""
    _run_stage("latency", params, debug)


@app.command("latent-stats")
def latent_stats(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """Per-class and global firing statistics of the SAE latents, top sets and overlaps."""
    _run_stage("latent_stats", params, debug)


@app.command()
def interpret(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """What each latent responds to (galleries, labels, purity) and which heads it moves."""
    _run_stage("interpret", params, debug)


ExploreDirOption = typer.Option(Path("explore"), "--out", help="Folder for latent_<N>.png (git-ignored by default).")


def _explore(fn, debug: bool):
    try:
        return fn()
    except PipelineError as exc:
        if debug:
            raise
        _fail(str(exc), 1)


@app.command()
def latent(
    index: int = typer.Argument(..., help="Latent id."),
    images: int = typer.Option(16, "--images", help="Training images in the grid."),
    out: Path = ExploreDirOption,
    debug: bool = DebugOption,
) -> None:
    """One latent: label, purity, firing rate, attribution per head, and its image grid."""
    from pipeline.explore import describe_latent

    text, path = _explore(lambda: describe_latent(index, out, images), debug)
    typer.echo(text)
    if path is not None:
        typer.echo(f"image grid: {path}")


@app.command("class")
def class_card(name: str = typer.Argument(..., help="Class name, as in the report."), debug: bool = DebugOption) -> None:
    """One class's card: its top latents, the heads they push, shared latents, steering outcome."""
    from pipeline.explore import describe_class

    typer.echo(_explore(lambda: describe_class(name), debug))


ExportDirOption = typer.Option(None, "--out", help="Output folder (default explore/pruned-<classes>).")


@app.command("export-pruned")
def export_pruned(
    classes: str = typer.Option(..., "--classes", help="Comma-separated class names, e.g. bowl,plate."),
    heads: str = typer.Option("majority", "--heads", help="majority: per block the heads most of these classes' training "
                              "images keep; headline: the heads the steering headline keeps (in the final block, the others "
                              "by majority; in every gated block after a multi-block sweep)."),
    out: Path | None = ExportDirOption,
    debug: bool = DebugOption,
) -> None:
    """A compact model keeping, per block, the heads most of these classes' images keep."""
    _setup_logging()
    from pipeline.export_pruned import describe, export

    names = [c.strip() for c in classes.split(",") if c.strip()]
    folder = out or Path("explore") / ("pruned-" + "-".join(names) + ("-headline" if heads == "headline" else ""))
    result = _explore(lambda: export(names, folder, heads=heads), debug)
    typer.echo(describe(result))
    typer.echo(f"written: {folder}/model.safetensors, config.json, export.json")


@app.command()
def steer(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """Amplify latent sets, measure accuracy and head usage; writes data/steer/ and its metrics."""
    _run_stage("steer", params, debug)


@app.command()
def ceiling(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """Per class, the fixed final-block gate patterns under steering's headline rule; writes data/ceiling/."""
    _run_stage("ceiling", params, debug)


@app.command()
def report(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """Write metrics/report.md and its figures from the outputs of `steer`, `ceiling` and `interpret`."""
    _run_stage("report", params, debug)


@app.command()
def explorer(params: Path = ParamsOption, debug: bool = DebugOption) -> None:
    """Write the latent explorer, metrics/explorer/index.html: a static site of every alive latent and class (opens from disk)."""
    _run_stage("explorer", params, debug)


PatternOption = typer.Option(..., "--pattern", help="Regular expression on experiment names, e.g. '^demo-seed-'.")
SummaryDirOption = typer.Option(Path("metrics/summary"), "--out", help="Directory for summary.md, summary.json, summary.png.")


@app.command()
def summarize(pattern: str = PatternOption, out: Path = SummaryDirOption, debug: bool = DebugOption) -> None:
    """Across finished DVC experiments: spread of the headline numbers and sign agreement."""
    _setup_logging()
    from pipeline.report.summary import collect, write_summary
    from pipeline.report.summary import summarize as summarize_runs

    try:
        runs = collect(pattern)
        summary = summarize_runs(runs)
        write_summary(summary, runs, out)
    except PipelineError as exc:
        if debug:
            raise
        _fail(str(exc), 1)
    typer.echo(f"{len(runs)} runs summarised in {out}/summary.md")


CompareDirOption = typer.Option(Path("metrics/compare"), "--out", help="Directory for comparison.md and comparison.json.")


@app.command()
def compare(pattern: str = PatternOption, out: Path = CompareDirOption, debug: bool = DebugOption) -> None:
    """Across finished DVC experiments (e.g. SAE architectures): one row each of SAE quality,
    purity against its baselines, the steering headline and its share of the ceiling."""
    _setup_logging()
    from pipeline.report.compare import compare as compare_runs
    from pipeline.report.compare import write_comparison
    from pipeline.report.summary import collect

    try:
        rows = compare_runs(collect(pattern))
        write_comparison(rows, out)
    except PipelineError as exc:
        if debug:
            raise
        _fail(str(exc), 1)
    typer.echo(f"{len(rows)} runs compared in {out}/comparison.md")
