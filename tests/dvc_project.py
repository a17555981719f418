"""A throwaway copy of this project in a temporary git repository, and the real `dvc`/`git`
run on it: shared by the DVC integration tests (test_pipeline_dvc.py, test_dvc_workflow.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipeline.params.file import parse_params

from conftest import REPO_ROOT, dvc_env

PROJECT_FILES = [
    "dvc.yaml", "pyproject.toml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", ".gitignore",
    ".dvc/plots/series.json", ".dvc/plots/series_band.json", ".dvc/plots/live_series.json",
    # committed folders that hold the per-block stages' outputs (`steer` depends on them)
    "models/sae_blocks/README.md", "data/stats_blocks/README.md",
]


def run(cwd: Path, *args: str, shell: bool = False) -> subprocess.CompletedProcess:
    """Run a command that must succeed (`shell`: args[0] is a shell command line)."""
    command: Any = args[0] if shell else list(args)
    result = subprocess.run(command, cwd=cwd, env=dvc_env(), capture_output=True, text=True, shell=shell, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def sh(cwd: Path, *args: str, shell: bool = False) -> str:
    """Run a command that must succeed; its stdout and stderr together."""
    result = run(cwd, *args, shell=shell)
    return result.stdout + result.stderr


def ran_stages(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def full_params(raw: dict[str, Any]) -> dict[str, Any]:
    """Every key explicit, as in the real params.yaml (dvc.yaml interpolates some of them)."""
    return parse_params(raw).model_dump(mode="json")


def commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)


def new_project(base: Path, params: dict[str, Any]) -> Path:
    """A copy of the project (code, dvc.yaml, DVC config) with `params`, committed to git."""
    repo = base / "repo"
    repo.mkdir(parents=True)
    for name in PROJECT_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, repo / name)
    shutil.copytree(REPO_ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(full_params(params), sort_keys=False))
    sh(repo, "git", "init", "-q")
    commit(repo, "tiny project")
    return repo
