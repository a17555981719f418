"""Day-to-day DVC use, on the real `dvc` in a temporary git repository (TINY params).

One tiny project is run once per module and then changed step by step: configurations as
experiments, the documented queued sweep, push/pull through the default remote, and which
stages a change reruns. A second clean run checks that every output hash is reproducible.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.params.file import parse_params
from pipeline.params.steer import SteerParams
from pipeline.report.summary import flatten
from pipeline.steering.strategies import STRATEGIES

from conftest import REPO_ROOT, TINY_PARAMS, dvc_env
from dvc_project import commit, new_project, ran_stages, run, sh

ALL_STAGES = {"download", "finetune", "extract", "train_sae", "latent_stats", "interpret", "steer", "ceiling", "latency", "report",
              "explorer"}
"""The stages a default run has; the per-block stages below generate none while extract.layers is empty."""
BLOCK_STAGES = {"train_sae_block", "latent_stats_block"}
"""`foreach` definitions over extract.layers: one stage per listed block."""
SAMPLE_BLOCK = 2
COMMITTED_FOLDERS = {"models/sae_blocks", "data/stats_blocks"}
"""Deps that are committed folders (a README.md) holding the per-block stages' outputs."""


def stage_definitions() -> dict[str, dict]:
    """dvc.yaml's stages by definition name; a `foreach` definition as its stage for block
    SAMPLE_BLOCK (its `do`, with ${item} substituted)."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        if "foreach" in stage:
            assert stage["foreach"] == "${extract.layers}", name
            stage = yaml.safe_load(yaml.safe_dump(stage["do"]).replace("${item}", str(SAMPLE_BLOCK)))
        out[name] = stage
    return out


# ------------------------------------------------------------------------------- helpers
def set_param(repo: Path, section: str, key: str, value: Any) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def out_hashes(repo: Path) -> dict[str, str]:
    """Every stage output's DVC hash, from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def cached_outs(repo: Path) -> list[str]:
    """Stage outputs that go to the DVC cache (and so to the remote)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    outs = []
    for stage in stages.values():
        for out in stage.get("outs", []):
            path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            if opts.get("cache", True):
                outs.append(path)
    return outs


flat = flatten  # nested params and metrics as dotted keys


@dataclass
class Project:
    repo: Path
    first_run_hashes: dict[str, str]
    second_clean_run: subprocess.CompletedProcess
    second_clean_run_hashes: dict[str, str]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The tiny project after one full `dvc repro`, committed. Tests below change it in turn
    and leave it committed and up to date.

    A second copy at another path runs `dvc repro` from scratch at the same time (two cores,
    and the two runs mostly wait on Python imports): the determinism test compares the two.
    """
    repo = new_project(tmp_path_factory.mktemp("workflow"), TINY_PARAMS)
    other = new_project(tmp_path_factory.mktemp("second-clean-run"), TINY_PARAMS)
    second = subprocess.Popen(["dvc", "repro"], cwd=other, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert ran_stages(sh(repo, "dvc", "repro")) == ALL_STAGES
    finally:
        output, _ = second.communicate(timeout=600)
    commit(repo, "first run")
    second_run = subprocess.CompletedProcess(second.args, second.returncode, output)
    second_hashes = out_hashes(other) if second.returncode == 0 else {}
    return Project(repo, out_hashes(repo), second_run, second_hashes)


# ------------------------------------------------------------------------- configurations
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def test_the_cpu_and_paper_configurations_exist_beside_the_demo_params():
    assert {p.stem for p in CONFIGS} >= {"cifar100-cpu", "cifar100-gpu", "paper"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_configuration_is_a_full_valid_params_file(path):
    raw = yaml.safe_load(path.read_text())
    parse_params(raw, str(path))
    # every key of params.yaml spelled out, so `dvc exp show` gets the same columns for all
    reference = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    missing, unknown = set(flat(reference)) - set(flat(raw)), set(flat(raw)) - set(flat(reference))
    assert not missing and not unknown, f"{path.name}: keys missing {sorted(missing)}, not in params.yaml {sorted(unknown)}"


def test_configuration_values_are_the_documented_ones():
    cifar = yaml.safe_load((REPO_ROOT / "configs/cifar100-cpu.yaml").read_text())
    assert cifar["data"]["source"] == "imagefolder" and cifar["data"]["path"] == "data/images/cifar100"
    assert (cifar["model"]["img_size"], cifar["model"]["patch_size"], cifar["model"]["depth"]) == (32, 4, 6)
    paper = parse_params(yaml.safe_load((REPO_ROOT / "configs/paper.yaml").read_text()))
    assert paper.data.source == "cifar100" and paper.model.pretrained and paper.model.img_size == 224
    assert paper.model.embed_dim in (None, 384) and paper.sae.epochs == 100 and paper.sae.expansion * 384 == 3072
    assert paper.finetune.device == "auto" and paper.finetune.precision == "bf16"


@pytest.mark.slow
def test_a_configuration_runs_as_an_experiment_and_a_report_param_reruns_report_only(project):
    """The documented command for a configuration; its values and the headline metrics are
    `dvc exp show` columns. The configuration differs only in a key that only the report reads
    (how many latents a class card shows): only `report` reruns."""
    repo = project.repo
    alt = yaml.safe_load((repo / "params.yaml").read_text())
    alt["interpret"]["card_latents"] = 1
    (repo / "configs").mkdir(exist_ok=True)
    (repo / "configs/alt.yaml").write_text(yaml.safe_dump(alt, sort_keys=False))
    commit(repo, "a configuration")

    # the documented command (docs/EXPERIMENTS.md)
    out = sh(repo, "cp configs/alt.yaml params.yaml && dvc exp run -n alt", shell=True)
    assert ran_stages(out) == {"report"}

    shown = _exp_show(repo)
    row = shown["alt"]
    assert row["params"]["interpret.card_latents"] == 1 and row["params"]["sae.k"] == TINY_PARAMS["sae"]["k"]
    metrics = row["metrics"]
    for column in [
        "metrics/finetune/metrics.json:test_accuracy",
        "metrics/finetune/metrics.json:head_usage",
        "metrics/finetune/metrics.json:gflops",
        "metrics/sae/metrics.json:fvu",
        "metrics/sae/metrics.json:l0",
        "metrics/sae/metrics.json:dead_fraction",
        "metrics/latent_stats.json:overlap",
        "metrics/latent_stats.json:jaccard",
        "metrics/interpret.json:purity",
        "metrics/steer.json:usage_drop",
        "metrics/steer.json:acc_change",
        "metrics/steer.json:fewer_heads",
        "metrics/ceiling.json:ceiling_drop",
    ]:
        assert isinstance(metrics.get(column), (int, float)), f"{column} is not a scalar column: {metrics.get(column)!r}"
    assert metrics["metrics/sae/metrics.json:l0"] == TINY_PARAMS["sae"]["k"]
    # only the headline: descriptions (counts, widths, hashes, settings) are not metrics
    # and DVCLive's epoch counter of the two training logs (docs/EXPERIMENTS.md, section 3)
    assert metrics["metrics/finetune/metrics.json:step"] == TINY_PARAMS["finetune"]["epochs"]
    assert metrics["metrics/sae/metrics.json:step"] == TINY_PARAMS["sae"]["epochs"]
    assert len(metrics) == 13 + 2, sorted(metrics)  # the 13 above and the two steps, exactly
    commit(repo, "alt applied")


def _exp_show(repo: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """`dvc exp show --json` as {experiment name or rev: {"params": {...}, "metrics": {...}}}."""
    rows = json.loads(run(repo, "dvc", "exp", "show", "--json").stdout)
    table: dict[str, dict[str, dict[str, Any]]] = {}

    def add(entry: dict[str, Any]) -> None:
        for revision in entry.get("experiments") or []:
            for child in revision.get("revs") or []:
                add(child)
        data = entry.get("data") or {}
        name = entry.get("name") or data.get("rev") or entry.get("rev")
        params = {k: v for f in (data.get("params") or {}).values() for k, v in flat(f.get("data") or {}).items()}
        metrics = {
            f"{path}:{k}": v for path, f in (data.get("metrics") or {}).items() for k, v in flat(f.get("data") or {}).items()
        }
        table[name] = {"params": params, "metrics": metrics}

    for entry in rows:
        add(entry)
    return table


# ------------------------------------------------------------------------------- sharing
# ---------------------------------------------------------------------- what a user opens
PLOT_IDS = [
    "finetune_accuracy", "finetune_loss", "finetune_gflops", "finetune_block_usage", "sae_fvu", "sae_dead", "class_overlap",
    "steer_accuracy", "steer_usage", "steer_class_usage",
    "metrics/plots/overlap_heatmap.png", "metrics/plots/firing_frequency.png", "metrics/plots/steer_curves.png",
    "metrics/plots/head_keep_heatmap.png", "metrics/plots/steer_class_usage.png", "metrics/plots/latent_grid.png",
    "metrics/plots/purity.png", "metrics/plots/class_cards.png", "metrics/plots/attribution_heatmap.png",
    "metrics/plots/shift_vs_keep.png", "metrics/plots/ceiling_frontier.png", "metrics/plots/block_usage.png",
]


def _plots(repo: Path) -> dict[str, list[dict[str, Any]]]:
    return json.loads(run(repo, "dvc", "plots", "show", "--json").stdout)["data"]


def _axis_titles(spec: dict[str, Any]) -> dict[str, Any]:
    """The x and y axis titles of a Vega-Lite spec, looking into its layers."""
    titles = {}
    for part in [spec, *spec.get("layer", [])]:
        for axis in ("x", "y"):
            title = (part.get("encoding") or {}).get(axis, {}).get("title")
            if title:
                titles.setdefault(axis, title)
    return titles


@pytest.mark.slow
def test_dvc_plots_show_draws_each_figure_once_titled_with_labelled_axes(project):
    plots = _plots(project.repo)
    assert list(plots) == PLOT_IDS  # the figures defined in dvc.yaml, nothing drawn by default
    dvc_yaml = yaml.safe_load((project.repo / "dvc.yaml").read_text())
    assert not any("plots" in stage for stage in dvc_yaml["stages"].values())  # no stage-level plots
    drawn = []  # the data files of the figures
    for definition in dvc_yaml["plots"]:
        drawn += [definition] if isinstance(definition, str) else list(next(iter(definition.values()))["y"])
    assert len(drawn) == len(set(drawn)), drawn  # no file is drawn twice
    for plot_id, renders in plots.items():
        assert len(renders) == 1, plot_id  # one revision: the workspace
        render = renders[0]
        if render["type"] == "image":
            continue
        spec = render["content"]
        title = spec["title"]["text"] if isinstance(spec["title"], dict) else spec["title"]
        assert title and "<DVC" not in title, plot_id
        axes = _axis_titles(spec)
        assert set(axes) == {"x", "y"} and all("<DVC" not in t for t in axes.values()), (plot_id, axes)
        assert axes["x"] != "step", plot_id  # no DVC default plot against `step`
    # the series templates colour one line per series, with a legend titled in words
    usage = plots["steer_usage"][0]["content"]
    assert usage["encoding"]["color"]["field"] == "series"
    assert {row["series"] for row in usage["data"]["values"]} == set(SteerParams().strategies)  # the default: every strategy


@pytest.mark.slow
def test_every_vega_plot_renders_offline_to_a_png(project, tmp_path):
    vl_convert = pytest.importorskip("vl_convert")
    for plot_id, renders in _plots(project.repo).items():
        if renders[0]["type"] != "vega":
            continue
        png = vl_convert.vegalite_to_png(renders[0]["content"])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, plot_id
        (tmp_path / f"{plot_id}.png").write_bytes(png)


EXP_SHOW = ["dvc", "exp", "show", "--only-changed", "--drop", "Created|data/|models/|metrics/", "--no-pager"]
"""The documented command (docs/EXPERIMENTS.md): changed columns only, without the columns of
changed data dependencies (full 32-character hashes) and the creation time."""


@pytest.mark.slow
def test_dvc_exp_show_after_a_one_parameter_sweep_is_legible_at_120_columns(project):
    repo = project.repo
    # k 6 (the tiny params have 4) moves the SAE's fvu, l0 and dead fraction and the top sets'
    # jaccard; the tiny run's `overlap` is 0.5 at every k, so --only-changed never shows it
    sh(repo, "dvc", "exp", "run", "--temp", "-n", "k6", "-S", "sae.k=6")  # --temp: the workspace stays as it is
    env = {**dvc_env(), "COLUMNS": "120"}
    out = subprocess.run(EXP_SHOW, cwd=repo, env=env, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    header = next(line for line in lines if "Experiment" in line)
    assert "…" not in header, out
    for column in ("sae.k", "fvu", "l0", "dead_fraction", "jaccard"):
        assert f" {column} " in f" {header} ", (column, out)
    assert max(len(line) for line in lines) <= 120
    assert any("k6" in line for line in lines)
    # the plain command also shows each changed data dependency's hash: what --drop removes
    plain = subprocess.run(["dvc", "exp", "show", "--only-changed", "--no-pager"], cwd=repo,
                           env={**env, "COLUMNS": "2000"}, capture_output=True, text=True, check=True).stdout
    assert "models/sae" in plain
    sh(repo, "dvc", "exp", "remove", "k6")


@pytest.mark.slow
def test_push_then_a_fresh_clone_pulls_every_output_and_reruns_nothing(project):
    repo = project.repo
    sh(repo, "dvc", "push")
    remote = repo.parent / "dvc-remote"  # the committed default: a sibling of the repository
    assert any(p.is_file() for p in remote.rglob("*"))

    clone = repo.parent / "clone"
    sh(repo.parent, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "models/sae").exists()
    sh(clone, "dvc", "pull")
    for path in out_hashes(repo):
        assert (clone / path).exists(), f"{path} missing after dvc pull"
    status = sh(clone, "dvc", "status")
    assert "up to date" in status and "changed" not in status
    assert ran_stages(sh(clone, "dvc", "repro")) == set()
    assert out_hashes(clone) == out_hashes(repo)
    # what the remote shares is safetensors, JSON and Parquet: nothing that is unpickled
    shared = [f for out in cached_outs(clone) for f in [clone / out, *(clone / out).rglob("*")] if f.is_file()]
    assert {"models/vit", "models/sae", "data/embeddings"} <= set(cached_outs(clone))
    assert {f.suffix for f in shared} == {".safetensors", ".json", ".parquet"}


# ----------------------------------------------------------------- only changed steps rerun
def _pipeline_imports(path: Path) -> set[str]:
    """Modules of the `pipeline` package that a source file imports (anywhere in it, except
    under `if TYPE_CHECKING:`, which never runs)."""
    tree = ast.parse(path.read_text())
    unused = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
              and node.test.id == "TYPE_CHECKING" for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in (n for n in ast.walk(tree) if id(n) not in unused):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipeline import x`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "pipeline")
    return found


# Packages whose __init__ finds its modules at run time (a registry): importing the package
# uses every module in it, which no import statement names.
DISCOVERED_PACKAGES = {"pipeline.data.sources"}


def _module_file(name: str) -> Path | None:
    for path in (REPO_ROOT / (name.replace(".", "/") + ".py"), REPO_ROOT / name.replace(".", "/") / "__init__.py"):
        if path.exists():
            return path
    return None


def _only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def _code_closure(module: str) -> set[str]:
    """The .py files of `module` and of every pipeline module it imports, transitively, with
    the packages Python runs on the way (`import a.b.c` runs a/__init__.py and a/b/__init__.py
    first). A package file that holds nothing but a docstring runs no code: never a dependency."""
    files, todo, seen = set(), [module], set()
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        if name in DISCOVERED_PACKAGES:
            todo += [f"{name}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__"]
        if not (path.name == "__init__.py" and _only_a_docstring(path)):
            files.add(path.relative_to(REPO_ROOT).as_posix())
        todo.extend(_pipeline_imports(path))
    return files


def _listed_code(deps: list[str]) -> set[str]:
    """The pipeline .py files a stage's deps name (a directory stands for every file in it)."""
    files = set()
    for dep in deps:
        if not dep.startswith("pipeline/"):
            continue
        path = REPO_ROOT / dep
        found = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        files.update(f.relative_to(REPO_ROOT).as_posix() for f in found)
    return files


def test_every_package_says_what_lives_there_and_runs_no_code_unless_it_is_a_registry():
    """Each subpackage's __init__ is one docstring (the map a newcomer reads), which is also
    what keeps it out of every stage's dependencies; only a registry package holds code."""
    for init in sorted((REPO_ROOT / "pipeline").rglob("__init__.py")):
        name = init.parent.relative_to(REPO_ROOT).as_posix().replace("/", ".")
        assert ast.get_docstring(ast.parse(init.read_text())), f"{name} has no docstring"
        assert _only_a_docstring(init) or name in DISCOVERED_PACKAGES, name


def test_every_stage_lists_exactly_the_code_it_imports():
    """What makes "only changed steps rerun" true for code: a module a stage imports but does
    not list would not rerun it when edited; one it lists but does not import reruns it for
    nothing."""
    stages = stage_definitions()
    assert set(stages) == ALL_STAGES | BLOCK_STAGES
    for name, stage in stages.items():
        assert _listed_code(stage["deps"]) == _code_closure(f"pipeline.stages.{name}"), name


def test_the_split_keeps_sources_and_the_sae_trainer_out_of_stages_that_do_not_use_them():
    """The point of the module split: editing a data source reruns `download` only, editing the
    SAE trainer reruns `train_sae` only, and `extract` no longer depends on the training loop."""
    closures = {name: _code_closure(f"pipeline.stages.{name}") for name in ALL_STAGES}
    source_files = {f"pipeline/data/sources/{p.name}" for p in (REPO_ROOT / "pipeline/data/sources").glob("*.py")}
    assert {"pipeline/data/sources/synthetic.py", "pipeline/data/sources/imagefolder.py", "pipeline/data/sources/cifar100.py"} <= source_files
    assert [n for n, c in closures.items() if c & source_files] == ["download"]
    assert [n for n, c in closures.items() if "pipeline/sae/training.py" in c] == ["train_sae"]
    assert "pipeline/model/training.py" not in closures["extract"]
    assert {n for n, c in closures.items() if "pipeline/data/dataset.py" in c} == {"download", "finetune", "extract", "interpret", "steer", "ceiling",
                                                                               "latency", "report", "explorer"}
    # each params section's code is a dependency of exactly the stages that read it
    readers = {name: {n for n, c in closures.items() if f"pipeline/params/{name}.py" in c}
               for name in ("data", "finetune", "extract", "sae", "stats", "interpret", "steer", "ceiling", "latency")}
    assert readers == {"data": {"download", "report"}, "finetune": {"finetune", "report"}, "extract": {"extract", "report"},
                       "sae": {"train_sae", "report"}, "stats": {"latent_stats", "report"},
                       "interpret": {"interpret", "report"}, "steer": {"steer", "report"}, "ceiling": {"ceiling", "report"},
                       "latency": {"latency", "report"}}
    # the report's code is its own: the sweep does not depend on how its results are written up
    assert [n for n, c in closures.items() if "pipeline/report/render.py" in c] == ["report"]


def _outputs(stage: dict) -> set[str]:
    """Everything a dvc.yaml stage declares it writes: outs, metrics and plots."""
    paths = set()
    for kind in ("outs", "metrics", "plots"):
        for out in stage.get(kind, []):
            paths.add(out if isinstance(out, str) else next(iter(out)))
    return paths


def test_the_layout_modules_and_dvc_yaml_name_the_same_paths():
    """pipeline/layout/<stage>.py is where the code gets its paths; dvc.yaml is where DVC does.
    A stage writes exactly what dvc.yaml declares, and reads only what it lists as deps."""
    import importlib

    stages = stage_definitions()
    for name, stage in stages.items():
        layout = importlib.import_module(f"pipeline.layout.{name}")
        writes, reads = (layout.writes(SAMPLE_BLOCK), layout.reads(SAMPLE_BLOCK)) if name in BLOCK_STAGES else (layout.WRITES, layout.READS)
        assert {p.as_posix() for p in writes} == _outputs(stage), name
        assert {p.as_posix() for p in reads} <= set(stage["deps"]), name
        upstream = {path for other in stages.values() for path in _outputs(other)} | COMMITTED_FOLDERS
        assert {d for d in stage["deps"] if not d.startswith("pipeline/")} <= upstream, name


@pytest.mark.slow
def test_an_sae_param_reruns_train_sae_latent_stats_interpret_steer_and_report_only(project):
    set_param(project.repo, "sae", "seed", 1)
    assert ran_stages(sh(project.repo, "dvc", "repro")) == {"train_sae", "latent_stats", "interpret", "steer", "latency", "report",
                                                             "explorer"}
    commit(project.repo, "sae seed")


@pytest.mark.slow
def test_editing_a_stage_reruns_it_and_its_dependents_only(project):
    repo = project.repo
    stage = repo / "pipeline/stages/latent_stats.py"
    original = stage.read_text()
    # A change of behaviour (the stage now uses top_k 3): latent_stats and, its outputs
    # changing, interpret and steer rerun; nothing upstream does.
    stage.write_text(
        original
        + "\n\n_run = run\n\n\ndef run(cfg):\n"
        + "    _run(cfg.model_copy(update={'top_k': 3}))\n"
    )
    assert ran_stages(sh(repo, "dvc", "repro")) == {"latent_stats", "interpret", "steer", "latency", "report", "explorer"}
    top_sets = json.loads((repo / "data/stats/top_sets.json").read_text())
    assert len(top_sets["global"]) == 3
    commit(repo, "latent_stats edited")

    # A change that keeps every output byte-identical (a comment) reruns that stage only:
    # its outputs' hashes are unchanged, so DVC stops there.
    train_sae = repo / "pipeline/stages/train_sae.py"
    train_sae.write_text(train_sae.read_text() + "\n# a comment\n")
    assert ran_stages(sh(repo, "dvc", "repro")) == {"train_sae"}
    commit(repo, "comment")


@pytest.mark.slow
def test_editing_a_source_or_the_sae_trainer_reruns_only_its_stage(project):
    """The rerun guarantee of the module split, on the real `dvc`: an edited CIFAR-100 error message reruns
    `download` alone (its data set comes out byte-identical, so `finetune` stays cached), and
    an edit of the SAE trainer that keeps its outputs reruns `train_sae` alone."""
    repo = project.repo
    cifar = repo / "pipeline/data/sources/cifar100.py"
    cifar.write_text(cifar.read_text().replace("no network?", "no network here?"))
    status = sh(repo, "dvc", "status")
    assert "download" in status and "finetune" not in status
    assert ran_stages(sh(repo, "dvc", "repro")) == {"download"}
    commit(repo, "cifar100 message")

    trainer = repo / "pipeline/sae/training.py"
    trainer.write_text(trainer.read_text() + "\n# a comment\n")
    assert ran_stages(sh(repo, "dvc", "repro")) == {"train_sae"}
    commit(repo, "trainer comment")


@pytest.mark.slow
def test_a_report_wording_edit_reruns_report_alone(project):
    """The report is its own stage: rewording a heading reruns `report`, never the sweep."""
    repo = project.repo
    render = repo / "pipeline/report/render.py"
    render.write_text(render.read_text().replace('"## Figures"', '"## The figures"'))
    assert ran_stages(sh(repo, "dvc", "repro")) == {"report"}
    assert "## The figures" in (repo / "metrics/report.md").read_text()
    commit(repo, "report wording")


@pytest.mark.slow
def test_editing_one_params_section_reruns_only_the_stages_that_read_it(project):
    """A section's model lives in its own module: an edit to the steering params' code reruns
    `steer` and `report` (which prints steering choices); one to the SAE params' code reruns
    `train_sae` (whose outputs come out byte-identical, so nothing after it follows) and
    `report`, and never `finetune` or `extract`."""
    repo = project.repo
    steer = repo / "pipeline/params/steer.py"
    steer.write_text(steer.read_text().replace('"""Steering strengths;', '"""The steering strengths;'))
    assert ran_stages(sh(repo, "dvc", "repro")) == {"steer", "report"}
    commit(repo, "steer params docstring")

    sae = repo / "pipeline/params/sae.py"
    sae.write_text(sae.read_text() + "\n# a note on the SAE's parameters\n")
    assert ran_stages(sh(repo, "dvc", "repro")) == {"train_sae", "report"}
    commit(repo, "sae params comment")


# ------------------------------------------------------------------------------ sweeps
def _workers(repo: Path) -> list[int]:
    """Processes (other than this one) running inside the repository: queue workers and
    their experiment runs."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if cwd == repo or repo in cwd.parents:
            pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def queue_workers_stopped(repo: Path) -> Iterator[None]:
    """Whatever happens inside, stop the queue and wait until no worker is left."""
    try:
        yield
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=dvc_env(), capture_output=True, timeout=120)
        deadline = time.monotonic() + 60
        while _workers(repo) and time.monotonic() < deadline:
            time.sleep(1)
        for pid in _workers(repo):  # still there after a minute: only ours can be inside repo
            os.kill(pid, signal.SIGKILL)
        assert not _workers(repo)


def _wait_for_queue(repo: Path, timeout: float, restart: bool = False) -> str:
    """Poll `dvc queue status` until nothing is queued or running. With `restart`, a queue left
    with queued tasks and no worker gets a new one: after an earlier `dvc queue stop` in the same
    repository, DVC's next worker can take the pending stop request after its first task."""
    deadline = time.monotonic() + timeout
    while True:
        status = sh(repo, "dvc", "queue", "status")
        if not any(word in status for word in ("Queued", "Running")):
            return status
        if restart and "Running" not in status and "0 active" in status:
            sh(repo, "dvc", "queue", "start")
        assert time.monotonic() < deadline, f"queue still busy after {timeout} s:\n{status}"
        time.sleep(3)


@pytest.mark.slow
def test_the_documented_sweep_runs_every_value_through_the_queue(project):
    repo = project.repo
    # The documented sweep is `-S 'sae.k=16,32,64'`; at this width (48 latents) two values.
    with queue_workers_stopped(repo):
        queued = sh(repo, "dvc", "exp", "run", "--queue", "-S", "sae.k=2,8")
        assert queued.count("Queued experiment") == 2
        sh(repo, "dvc", "queue", "start")
        status = _wait_for_queue(repo, timeout=480)
    assert status.count("Success") == 2, status
    runs = [row for row in _exp_show(repo).values() if row["params"].get("sae.k") in (2, 8) and row["metrics"]]
    assert sorted(row["params"]["sae.k"] for row in runs) == [2, 8]
    for row in runs:  # each experiment's own SAE: exactly k latents active per sample
        assert row["metrics"]["metrics/sae/metrics.json:l0"] == row["params"]["sae.k"]


@pytest.mark.slow
def test_a_queued_seed_sweep_runs_and_summarizes(project):
    """The documented seed sweep (docs/EXPERIMENTS.md, section 3) at tiny scale, then
    `pipeline summarize` over its runs."""
    repo = project.repo
    with queue_workers_stopped(repo):
        queued = sh(repo, "dvc", "exp", "run", "--queue", "-n", "seed", "-S", "finetune.seed=1,2")
        assert queued.count("Queued experiment") == 2
        sh(repo, "dvc", "queue", "start")
        status = _wait_for_queue(repo, timeout=480, restart=True)
    assert sum("seed-" in line and "Success" in line for line in status.splitlines()) == 2, status
    out = sh(repo, "pipeline", "summarize", "--pattern", "^seed-", "--out", "summary")
    assert "2 runs summarised" in out
    summary = json.loads((repo / "summary/summary.json").read_text())
    assert summary["runs"] == ["seed-1", "seed-2"]
    assert summary["headline"]["l0"]["mean"] == TINY_PARAMS["sae"]["k"] and summary["headline"]["l0"]["std"] == 0
    assert set(summary["strategies"]) == set(STRATEGIES) and all(e["runs"] == 2 for e in summary["strategies"].values())
    assert (repo / "summary/summary.png").exists() and "| strategy | alpha |" in (repo / "summary/summary.md").read_text()


# ------------------------------------------------------------------------- determinism
@pytest.mark.slow
def test_two_clean_runs_give_identical_hashes_for_every_output(project):
    # TINY params (for speed); the property holds for any params on the same CPU set-up
    # (same torch thread count: CPU kernels reduce in a thread-count dependent order).
    second = project.second_clean_run
    assert second.returncode == 0, second.stdout[-3000:]
    assert ran_stages(second.stdout) == ALL_STAGES
    first, other = project.first_run_hashes, project.second_clean_run_hashes
    assert set(other) == set(first) and len(first) >= 10
    different = sorted(path for path in first if first[path] != other[path])
    assert not different, f"outputs differ between two clean runs: {different}"
