"""`ceiling`: per class, what fixed final-block gate patterns reach under steering's headline rule.

Every image of the selection and test splits runs up to the final block once; every pattern then
goes through the final block's CLS row only (exact, `pipeline.model.cls_row`). The rule's keys
are `steer`'s, read as values: an SAE, alpha-grid or strategy change does not rerun this stage.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from pipeline.checks import same_rows
from pipeline.data.dataset import load_images
from pipeline.data.embeddings import read_embeddings
from pipeline.errors import PipelineError
from pipeline.layout import ceiling as files
from pipeline.layout import download, extract, finetune
from pipeline.model.cls_row import unsupported
from pipeline.model.config import head_names
from pipeline.model.gated_vit import load_gated_vit, resolve_head_path
from pipeline.params.ceiling import CeilingParams
from pipeline.runtime import pick_device
from pipeline.steering.ceiling import (
    CeilingDetails,
    CeilingSettings,
    SplitTerms,
    resolve_search,
    search_ceiling,
    split_terms,
    summarise,
    write_classes,
    write_details,
    write_patterns,
)
from pipeline.storage import atomic_path, clean_outputs, rounded, write_json

if TYPE_CHECKING:  # the rule's values arrive as DVC params; its section's code is not a dependency
    from pipeline.params.steer import SteerParams

log = logging.getLogger(__name__)


def load_split(split: str, model, config, cp: CeilingParams, device: torch.device) -> tuple[SplitTerms, float]:
    """A split's terms, and the share of its images whose CLS-row prediction (own gates) equals
    the full model's stored one."""
    images_path, embeddings_path = download.dataset_split(split), extract.embeddings_split(split)
    images, stored = load_images(images_path), read_embeddings(embeddings_path)
    same_rows(stored.labels, embeddings_path, images.labels, images_path, rerun="extract")
    terms = split_terms(model, config, images.images, images.labels, cp.batch_size, device, desc=f"ceiling {split}")
    if not torch.allclose(terms.terms.x0, stored.x, atol=1e-4, rtol=1e-4):
        raise PipelineError(f"{embeddings_path}: stored x differs from the model's; rerun extract")
    predictions_agree = float((terms.own_predictions == stored.predictions).double().mean()) if len(stored.labels) else 1.0
    return terms, predictions_agree


def run(cp: CeilingParams, sp: SteerParams) -> None:
    clean_outputs(*files.WRITES)
    start = time.perf_counter()
    model, config = load_gated_vit(finetune.MODEL)
    reason = unsupported(model)
    if reason:
        raise PipelineError(f"{finetune.MODEL}: the ceiling's CLS-row path does not apply ({reason})")
    device = pick_device(cp.device)
    model.head_path = resolve_head_path(cp.heads, device)
    search = resolve_search(cp.search, model.num_heads, cp.max_exhaustive_heads)
    splits = ["test"] if sp.select_on == "test" else [sp.select_on, "test"]
    loaded = {split: load_split(split, model, config, cp, device) for split in splits}
    select, test = loaded[sp.select_on][0], loaded["test"][0]
    model.cpu()
    found = search_ceiling(model, select, test, sp.select_on, config.class_names, sp.accuracy_tolerance, search)
    heads = head_names(model.num_heads, sp.head_index_base)
    summary = summarise(found, test, len(config.class_names), sp.select_on, heads, sp.bootstrap, sp.confidence, cp.seed)

    with atomic_path(files.CEILING, directory=True) as tmp:
        write_patterns(tmp / files.PATTERNS.name, found.rows)
        write_classes(tmp / files.CLASSES.name, found.classes)
    details = CeilingDetails(
        summary=summary,
        settings=CeilingSettings(search=search, patterns_per_class=found.patterns_per_class, accuracy_tolerance=sp.accuracy_tolerance,
                                 select_on=sp.select_on, bootstrap=sp.bootstrap, confidence=sp.confidence,
                                 images={s: int(t.labels.numel()) for s, (t, _) in loaded.items()},
                                 stored_predictions_agree={s: agree for s, (_, agree) in loaded.items()}),
        baseline={s: {"accuracy": float(t.own_correct.double().mean()), "head_usage": float(t.own_gates.mean())}
                  for s, (t, _) in loaded.items()},
        frontier=found.frontier,
    )
    write_details(files.DETAILS, details)
    write_json(files.METRICS, rounded(details.metrics()))
    log.info("ceiling (%s, %d patterns per class at most) in %.1f s: mean usage change %+.3f, accuracy %+.4f, %d classes with fewer heads",
             search, found.patterns_per_class, time.perf_counter() - start, summary.mean_usage_change, summary.mean_accuracy_change,
             summary.classes_with_reduction)
