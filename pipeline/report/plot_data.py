"""Data files for `dvc plots`: long tables, one row per (x, series) point.

DVC's own templates colour lines by revision and tell series apart only by dash style; the
project's templates in `.dvc/plots/` colour by the `series` field instead (and dash by
revision), so each data file holds one row per point with that field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.storage import rounded


def series_rows(x_name: str, x: Sequence[float], series: Mapping[str, Sequence[float | None]], y_name: str = "value") -> list[dict[str, Any]]:
    """{x_name: x[i], "series": name, y_name: values[i]} for every series and point (None skipped)."""
    return [
        {x_name: xi, "series": name, y_name: rounded(yi)}
        for name, values in series.items()
        for xi, yi in zip(x, values)
        if yi is not None
    ]
