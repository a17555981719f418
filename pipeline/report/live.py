"""The training stages' per-epoch log (`finetune`, `train_sae`), written with DVCLive in DVC's
standard layout, so that `dvc exp show` and `dvc plots` read a stage while it still runs.

Under a stage's log directory (its `pipeline/layout` module names it):
- `metrics.json`: the stage's headline, the keys `dvc exp show` lists, plus DVCLive's `step`
  (epochs done). It is rewritten after every epoch, so a running experiment's row fills in
  as it trains; the stage rewrites it once more with the final evaluation.
- `plots/metrics/<name>.tsv`: one row per epoch (`step`, value) of every scalar logged.
- `plots/custom/<name>.json`: long tables (one row per epoch and series) for figures with a
  number of lines known only at run time, such as one per gated block.

The figures themselves stay defined once, in `dvc.yaml`. DVCLive is used only to write: it
writes no dvc.yaml, no report and no experiment of its own, and it never posts to Studio
without a token (the Makefile also sets DVC_STUDIO_OFFLINE).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.storage import rounded

log = logging.getLogger(__name__)


def series_rows(x_name: str, x: Sequence[float], series: Mapping[str, Sequence[float | None]], y_name: str = "value") -> list[dict[str, Any]]:
    """{x_name: x[i], "series": name, y_name: values[i]} for every series and point (None skipped):
    the long table the project's `series` templates colour by `series`."""
    return [
        {x_name: xi, "series": name, y_name: rounded(yi)}
        for name, values in series.items()
        for xi, yi in zip(x, values)
        if yi is not None
    ]


class EpochLog:
    """One stage's DVCLive log. `epoch(n, curves, headline)` after every epoch; `finish(headline)`
    once the stage has its final numbers."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._opened: Any = None
        self._tables: dict[str, list[dict[str, Any]]] = {}

    @property
    def _live(self) -> Any:
        """The dvclive.Live, made at the first write: making one clears the previous run's log,
        which a stage that fails before its first epoch (a bad checkpoint) must leave as it was."""
        if self._opened is None:
            try:
                from dvclive import Live  # here: it imports DVC, which only the training stages need
            except ImportError:  # a machine that runs stages without DVC: the same files, by hand
                log.warning("dvclive is not installed: %s is written in its layout without it", self.directory)
                self._opened = SameLayout(self.directory)
            else:
                self._opened = Live(str(self.directory), report=None, save_dvc_exp=False, dvcyaml=None)
        return self._opened

    def epoch(self, n: int, curves: Mapping[str, float | None], headline: Mapping[str, float | None],
              tables: Mapping[str, Mapping[str, float | None]] | None = None) -> None:
        """Append epoch `n`'s scalars (one TSV each) and each table's rows ({series: value}),
        then publish `headline` as the summary."""
        self._live.step = n  # DVCLive's `step` is the epoch count: 1 after the first epoch
        for name, value in rounded(dict(curves)).items():
            if value is not None:  # a non-finite value (rounded to None) has no point to plot
                self._live.log_metric(name, value)
        for name, row in (tables or {}).items():
            self._tables.setdefault(name, []).extend(series_rows("epoch", [n], {k: [v] for k, v in row.items()}, y_name=name))
            self._live.log_plot(name, self._tables[name], x="epoch", y=name)
        self.finish(headline)

    def finish(self, headline: Mapping[str, float | None]) -> None:
        """Rewrite the summary as exactly `headline` (and `step`): the TSVs keep the history, and
        `dvc exp show` lists the headline alone, as it did before DVCLive."""
        self._live.summary = rounded(dict(headline))
        self._live.make_summary()


class SameLayout:
    """The part of dvclive.Live that EpochLog uses, writing the same bytes, for a machine that
    runs the stages with `python -m pipeline` and has no DVC (dvclive imports dvc): the
    air-gapped GPU machine of docs/EXPERIMENTS.md, section 1.2. tests/test_live.py keeps the two
    byte-identical."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        shutil.rmtree(self.directory / "plots", ignore_errors=True)  # as Live clears a previous run
        (self.directory / "metrics.json").unlink(missing_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.step = 0
        self.summary: dict[str, Any] = {}

    def log_metric(self, name: str, value: float) -> None:
        path = self.directory / "plots" / "metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator=os.linesep)
            if new:
                writer.writerow(["step", os.path.basename(name)])
            writer.writerow([self.step, value])

    def log_plot(self, name: str, datapoints: list[dict[str, Any]], x: str, y: str) -> None:
        self._dump(self.directory / "plots" / "custom" / f"{name}.json", datapoints)

    def make_summary(self) -> None:
        self.summary["step"] = self.step
        self._dump(self.directory / "metrics.json", self.summary)

    @staticmethod
    def _dump(path: Path, content: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")
