"""`latency`: what the steering headline and the ceiling cost as deployed models.

Each policy runs block by block as a deployed model would (`pipeline.steering.deploy`) on
`latency.images` test images evenly spaced over the split, on `latency.heads` (the head-skipping path by default, so
that dropped heads are not computed): the model's own gates; the per-class steering headline as
an oracle (each image steered with its true class's set at that class's alpha) and as the
deployable policy (the unsteered pass predicts the class, whose alpha the predicted-class
policy chose); the ceiling's class-specific fixed patterns (the multi-block ceiling's when
`steer.blocks` names several blocks). The steering's blocks, mode and alphas are the sweep's
(metrics/details/steer.json), the patterns the `ceiling` stage's, all chosen on the selection
split. Writes accuracy, usage per gated block and GFLOPs per image of each, and, with
`latency.measure`, the median CPU time per batch and per image at each batch size.
"""

from __future__ import annotations

import logging

import torch

from pipeline.data.dataset import load_images
from pipeline.errors import PipelineError
from pipeline.layout import ceiling, download, finetune, steer
from pipeline.layout import latency as files
from pipeline.model.gated_vit import GatedViT, load_gated_vit
from pipeline.params.latency import LatencyParams
from pipeline.steering.ceiling import read_block_classes, read_classes
from pipeline.steering.costs import LatencyDetails, write_details
from pipeline.steering.deploy import measure
from pipeline.steering.loading import block_steering
from pipeline.steering.results import SteerDetails, read_details
from pipeline.storage import clean_outputs, weights_sha256

log = logging.getLogger(__name__)


def alpha_table(alphas: dict[str, float], class_names: list[str]) -> torch.Tensor:
    """(C,) a policy's alpha per class (0 for a class it does not name)."""
    return torch.tensor([alphas.get(name, 0.0) for name in class_names])


def ceiling_patterns(model: GatedViT, class_names: list[str], blocks: list[int] | None) -> dict[int, torch.Tensor]:
    """Block -> (C, H) the ceiling's fixed pattern per class (a row of -1: the class keeps its own
    gates): the final block's (data/ceiling/classes.parquet) or, for several blocks, the
    multi-block ceiling's (blocks.parquet, configuration `blocks`)."""
    n_classes, n_heads = len(class_names), model.num_heads

    def pattern(heads: list[int] | None) -> torch.Tensor:
        if heads is None:
            return torch.full((n_heads,), -1.0)
        return torch.isin(torch.arange(n_heads), torch.tensor(heads, dtype=torch.long)).float()

    if blocks is None:
        chosen = {c.class_id: (None if c.pattern < 0 else c.heads) for c in read_classes(ceiling.CLASSES)}
        return {model.depth - 1: torch.stack([pattern(chosen.get(c)) for c in range(n_classes)])}
    rows, searched, _ = read_block_classes(ceiling.BLOCKS)
    if searched != blocks:
        raise PipelineError(f"{ceiling.BLOCKS} searched blocks {searched}, the sweep steered {blocks}; rerun ceiling")
    mine = {r["class_id"]: r for r in rows if r["split"] == "test" and r["configuration"] == "blocks"}
    return {b: torch.stack([pattern(mine[c][f"heads_b{b}"]) for c in range(n_classes)]) for b in blocks}


def run(lp: LatencyParams) -> None:
    clean_outputs(*files.WRITES)
    model, config = load_gated_vit(finetune.MODEL)
    details: SteerDetails = read_details(steer.DETAILS)
    if details.settings.model_sha256 not in (None, weights_sha256(finetune.MODEL)):
        raise PipelineError(f"{steer.DETAILS}: the sweep ran on other weights than {finetune.MODEL}; rerun steer")
    headline, predicted = details.per_class_headline, details.predicted_class_policy
    if headline is None or predicted is None:
        raise PipelineError(f"{steer.DETAILS} has no per-class headline or predicted-class policy: latency times those; "
                            "keep per_class and per_class_predicted among steer.strategies")
    blocks = details.settings.blocks or [model.depth - 1]
    steering = {b: block_steering(model, config, b, draws=1, seed=0)[0] for b in blocks}  # the class sets; no nulls timed
    patterns = ceiling_patterns(model, config.class_names, details.settings.blocks)

    test = load_images(download.dataset_split("test"))
    n = min(lp.images, len(test.labels))
    if n < max(lp.batch_sizes):
        raise PipelineError(f"latency.images {lp.images}: the test split's {n} images are fewer than the largest batch "
                            f"size {max(lp.batch_sizes)}")
    # evenly spaced over the split, which is stored class by class: every class, not the first few
    chosen = torch.arange(n) * len(test.labels) // n
    x, labels = config.preprocess(test.images[chosen]), test.labels[chosen]
    model.head_path = lp.heads
    previous = torch.get_num_threads()
    if lp.threads is not None:
        torch.set_num_threads(lp.threads)
    try:  # restored afterwards: other stages run in the same process in tests and notebooks
        result = measure(model, steering, x, labels, alpha_table(headline.alpha, config.class_names),
                         alpha_table(predicted.alpha, config.class_names), details.settings.mode, details.settings.keep_error,
                         patterns, tuple(lp.batch_sizes), lp.rounds, timed=lp.measure)
    finally:
        torch.set_num_threads(previous)
    write_details(files.DETAILS, result)
    _log(result)


def _log(result: LatencyDetails) -> None:
    base = result.policies["unsteered"]
    for name, p in result.policies.items():
        times = ", ".join(f"batch {b}: {t.image_ms:.3f} ms/image" for b, t in p.latency_ms.items())
        log.info("%s: accuracy %.4f, %.5f GFLOPs per image (%+.1f%%; with steering's own work %.5f)%s", name, p.accuracy, p.gflops,
                 100 * (p.gflops / base.gflops - 1), p.gflops_total, f"; {times}" if times else "")
