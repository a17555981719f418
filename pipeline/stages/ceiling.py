"""`ceiling`: per class, what fixed final-block gate patterns reach under steering's headline rule.

Every image of the selection and test splits runs up to the final block once; every pattern then
goes through the final block's CLS row only (exact, `pipeline.model.cls_row`). The rule's keys
are `steer`'s, read as values: an SAE, alpha-grid or strategy change does not rerun this stage.

When `steer.blocks` names more than the final block alone, the stage also searches fixed patterns
in exactly those blocks (`pipeline.steering.ceiling_blocks`, docs/METHOD.md section 8) and writes
data/ceiling/blocks.parquet and the details' `blocks` section; the final-block outputs are the
same either way.
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
    BlocksCeilingDetails,
    CeilingDetails,
    CeilingSettings,
    SplitTerms,
    resolve_search,
    search_ceiling,
    split_terms,
    summarise,
    write_block_classes,
    write_classes,
    write_details,
    write_patterns,
)
from pipeline.steering.ceiling_blocks import BlockSplit, block_split, class_rows, search_blocks, summarise_rows
from pipeline.steering.propagate import resolve_blocks
from pipeline.storage import atomic_path, clean_outputs, rounded, write_json

if TYPE_CHECKING:  # the rule's values arrive as DVC params; its section's code is not a dependency
    from pipeline.params.steer import SteerParams

log = logging.getLogger(__name__)


def load_split(split: str, model, config, cp: CeilingParams, device: torch.device,
               streams: dict[str, BlockSplit] | None = None, start: int = 0) -> tuple[SplitTerms, float]:
    """A split's terms, and the share of its images whose CLS-row prediction (own gates) equals
    the full model's stored one; with `streams`, also the images' stream entering block `start`
    (the ceiling across blocks) into streams[split]."""
    images_path, embeddings_path = download.dataset_split(split), extract.embeddings_split(split)
    images, stored = load_images(images_path), read_embeddings(embeddings_path)
    same_rows(stored.labels, embeddings_path, images.labels, images_path, rerun="extract")
    terms = split_terms(model, config, images.images, images.labels, cp.batch_size, device, desc=f"ceiling {split}")
    if not torch.allclose(terms.terms.x0, stored.x, atol=1e-4, rtol=1e-4):
        raise PipelineError(f"{embeddings_path}: stored x differs from the model's; rerun extract")
    predictions_agree = float((terms.own_predictions == stored.predictions).double().mean()) if len(stored.labels) else 1.0
    if streams is not None:
        streams[split] = block_split(model, config, images.images, images.labels, start, cp.batch_size, device)
    return terms, predictions_agree


def searched_blocks(blocks: str | list[int], model, cp: CeilingParams) -> list[int] | None:
    """`steer.blocks` as block indices, or None when it is the final block alone (`ceiling.py`'s
    search covers it)."""
    try:
        found = resolve_blocks(blocks, model)
    except ValueError as exc:
        raise PipelineError(f"steer.{exc}") from None
    if found == [model.depth - 1]:
        return None
    if model.num_heads > cp.max_exhaustive_heads:
        raise PipelineError(f"steer.blocks = {blocks!r}: the ceiling across blocks tries all 2^{model.num_heads} patterns "
                            f"in each searched block, more than ceiling.max_exhaustive_heads ({cp.max_exhaustive_heads}) allows")
    return found


def across_blocks(model, streams: dict[str, BlockSplit], blocks: list[int], class_names: list[str], sp: SteerParams,
                  cp: CeilingParams) -> tuple[list[dict], BlocksCeilingDetails]:
    """The search over `blocks` on the selection split, reported on test: blocks.parquet's rows
    (both splits) and the details' section."""
    start = time.perf_counter()
    select, test = streams[sp.select_on], streams["test"]
    found = search_blocks(model, select, test, blocks, len(class_names), sp.accuracy_tolerance)
    gated = list(range(model.keep_layers, model.depth))
    outcomes = {sp.select_on: (select, found.select), "test": (test, found.test)}  # one entry when select_on is test
    rows = [{"split": name, **row} for name, (split, outcome) in outcomes.items()
            for row in class_rows(found, split, outcome, class_names, model.num_heads, gated)]
    summary = summarise_rows(found, test, found.test, len(class_names), gated, sp.bootstrap, sp.confidence, cp.seed)
    log.info("ceiling across blocks: search and report in %.1f s (the time is logged, not written: the outputs stay "
             "byte-identical from run to run)", time.perf_counter() - start)
    return rows, BlocksCeilingDetails(blocks=found.blocks, gated_blocks=gated, select_on=sp.select_on, evaluations=found.evaluations,
                                      block_runs=found.pairs, rows=summary)


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
    blocks = searched_blocks(sp.blocks, model, cp)
    streams = None if blocks is None else {}
    splits = ["test"] if sp.select_on == "test" else [sp.select_on, "test"]
    loaded = {split: load_split(split, model, config, cp, device, streams, min(blocks or [0])) for split in splits}
    select, test = loaded[sp.select_on][0], loaded["test"][0]
    block_rows, across = [], None
    if blocks is not None:  # on `device`, with the streams the splits' loading computed
        block_rows, across = across_blocks(model, streams, blocks, config.class_names, sp, cp)
        del streams
    model.cpu()
    found = search_ceiling(model, select, test, sp.select_on, config.class_names, sp.accuracy_tolerance, search)
    heads = head_names(model.num_heads, sp.head_index_base)
    summary = summarise(found, test, len(config.class_names), sp.select_on, heads, sp.bootstrap, sp.confidence, cp.seed)

    with atomic_path(files.CEILING, directory=True) as tmp:
        write_patterns(tmp / files.PATTERNS.name, found.rows)
        write_classes(tmp / files.CLASSES.name, found.classes)
        if across is not None:
            write_block_classes(tmp / files.BLOCKS.name, block_rows, across.blocks, across.gated_blocks)
    details = CeilingDetails(
        summary=summary,
        settings=CeilingSettings(search=search, patterns_per_class=found.patterns_per_class, accuracy_tolerance=sp.accuracy_tolerance,
                                 select_on=sp.select_on, bootstrap=sp.bootstrap, confidence=sp.confidence,
                                 images={s: int(t.labels.numel()) for s, (t, _) in loaded.items()},
                                 stored_predictions_agree={s: agree for s, (_, agree) in loaded.items()}),
        baseline={s: {"accuracy": float(t.own_correct.double().mean()), "head_usage": float(t.own_gates.mean())}
                  for s, (t, _) in loaded.items()},
        frontier=found.frontier,
        blocks=across,
    )
    write_details(files.DETAILS, details)
    write_json(files.METRICS, rounded(details.metrics()))
    log.info("ceiling (%s, %d patterns per class at most) in %.1f s: mean usage change %+.3f, accuracy %+.4f, %d classes with fewer heads",
             search, found.patterns_per_class, time.perf_counter() - start, summary.mean_usage_change, summary.mean_accuracy_change,
             summary.classes_with_reduction)
    if across is not None:
        row = across.rows["blocks"]
        log.info("ceiling across blocks %s (%d evaluations, %d block runs): mean GFLOPs change %+.1f%%, accuracy %+.4f",
                 across.blocks, across.evaluations, across.block_runs, 100 * row.mean_gflops_relative_change,
                 row.mean_accuracy_change)
