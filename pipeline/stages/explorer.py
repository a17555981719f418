"""`explorer`: the latent explorer, metrics/explorer/, a static site that opens from disk.

Reads what `interpret` (labels, purity, attribution, galleries), `latent_stats` (the top sets,
activation mass by class, related classes), `steer` (each class's headline and its curve over
alpha) and `ceiling` (each class's fixed pattern) wrote, and the training images of the
galleries; writes index.html and one thumbnail strip per alive latent
(pipeline.report.explorer). Its own stage: a change to the site reruns nothing else, and a
change to the report does not rebuild the site.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from pipeline.data.dataset import read_image_groups
from pipeline.errors import PipelineError
from pipeline.interpret.cards import load_interpretation
from pipeline.interpret.records import read_stats_record
from pipeline.interpret.top_sets import read_top_sets
from pipeline.layout import ceiling, download, latent_stats, steer
from pipeline.layout import explorer as files
from pipeline.layout import interpret as interpret_files
from pipeline.report.explorer import ExplorerInputs, read_class_mass, read_gallery, site_data, write_site
from pipeline.steering.ceiling import read_classes
from pipeline.steering.results import read_details, read_headline, read_results
from pipeline.storage import atomic_path, clean_outputs

if TYPE_CHECKING:  # its values arrive as DVC params; the section's code is not a dependency
    from pipeline.params.interpret import InterpretParams

log = logging.getLogger(__name__)


def run(ip: InterpretParams, out: Path = files.EXPLORER) -> None:
    """Build the site into `out` (metrics/explorer; another folder for a look at a run without DVC)."""
    clean_outputs(out)
    inputs = read_inputs(ip.grid_images)
    data = site_data(inputs)
    alive = [latent["id"] for latent in data["latents"]]
    with atomic_path(out, directory=True) as tmp:
        write_site(tmp, data, thumbnails(inputs, alive))
    log.info("explorer: %d alive latents, %d classes in %s", len(alive), len(data["classes"]), out / "index.html")


def read_inputs(images_per_latent: int) -> ExplorerInputs:
    return ExplorerInputs(
        interp=load_interpretation(),
        top_sets=read_top_sets(latent_stats.TOP_SETS),
        related=read_stats_record(latent_stats.DETAILS).related,
        class_mass=read_class_mass(latent_stats.LATENTS),
        gallery=read_gallery(interpret_files.GALLERIES, images_per_latent),
        headline=read_headline(steer.HEADLINE),
        steer_rows=read_results(steer.RESULTS, split="test"),
        settings=read_details(steer.DETAILS).settings,
        ceiling=read_classes(ceiling.CLASSES),
    )


def thumbnails(inputs: ExplorerInputs, latents: list[int]) -> dict[int, np.ndarray]:
    """Each latent's gallery images, read from the train split and checked against the gallery's labels."""
    path = download.dataset_split("train")
    galleries = [[g.row for g in inputs.gallery.get(j, [])] for j in latents]
    try:
        images, labels, _ = read_image_groups(path, galleries)
    except (IndexError, KeyError, ValueError, pa.ArrowException) as exc:
        raise PipelineError(f"{path}: cannot read the gallery images ({exc}); rerun interpret") from None
    for j, found in zip(latents, labels):
        if [g.label for g in inputs.gallery.get(j, [])] != found.tolist():
            raise PipelineError(f"{path}: the labels of latent {j}'s gallery rows differ from {interpret_files.GALLERIES}; rerun interpret")
    return {j: pixels for j, pixels in zip(latents, images) if len(pixels)}
