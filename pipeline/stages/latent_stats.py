"""`latent_stats`: which SAE latents fire for which class (docs/METHOD.md, section 4).

Reads models/sae/ and data/embeddings/{train,test}.parquet. The top-K sets come from the
train split (steering uses them); test statistics are reported separately, together with how
well each class's test set agrees with its train set. Writes:
- data/stats/latents.parquet: long table (split, class, class_id, latent, frequency,
  mean_activation, count, rank), only rows with frequency > 0;
- data/stats/top_sets.json: the sets steering uses, plus each latent's mean active value;
- metrics/latent_stats.json (the headline overlaps), metrics/details/latent_stats.json,
  metrics/plots/class_overlap.json and two PNG figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.checks import labels_in_range, same_classes, same_width
from pipeline.data.embeddings import EmbeddingTable, read_embeddings
from pipeline.errors import ParamsError
from pipeline.interpret import stats as st
from pipeline.interpret.records import RelatedClass, SplitSummary, StatsRecord, write_stats_record
from pipeline.interpret.top_sets import TopSets, write_top_sets
from pipeline.layout import extract, train_sae
from pipeline.layout import latent_stats as files
from pipeline.params.stats import StatsParams
from pipeline.report import plots
from pipeline.sae.base import SparseAutoencoder
from pipeline.sae.registry import load_sae
from pipeline.storage import atomic_path, clean_outputs, parquet_writer, rounded, with_metadata, write_json

log = logging.getLogger(__name__)

TRAIN = extract.embeddings_split("train")
TEST = extract.embeddings_split("test")
ALL = "__all__"

LATENTS_SCHEMA = pa.schema(
    [
        pa.field("split", pa.string()),
        pa.field("class", pa.string()),
        pa.field("class_id", pa.int32()),
        pa.field("latent", pa.int32()),
        pa.field("frequency", pa.float64()),
        pa.field("mean_activation", pa.float64()),
        pa.field("count", pa.int64()),
        pa.field("rank", pa.int32()),
    ]
)


def run(cfg: StatsParams) -> None:
    clean_outputs(*files.WRITES)
    got = compute(cfg, train_sae.SAE, files.FINAL)
    record = got.record
    write_json(files.METRICS, {"overlap": record.overlap_global_vs_class, "jaccard": record.jaccard_global_vs_class})
    write_json(files.CLASS_OVERLAP, [
        {"class": name, "global_overlap": _r(o), "jaccard": _r(j)}
        for name, o, j in zip(got.class_names, got.global_overlap.tolist(), got.global_jaccard.tolist())
    ])
    plots.overlap_heatmap(got.overlap.numpy(), got.class_names, files.OVERLAP_HEATMAP,
                          title=f"Top-{cfg.top_k} latent overlap |A ∩ B| / K (train)")
    plots.frequency_histogram(got.train_frequency, files.FIRING_HISTOGRAM)


@dataclass(frozen=True)
class Computed:
    """What `compute` wrote, plus what the final block's figures are drawn from."""

    record: StatsRecord
    class_names: list[str]
    train_frequency: np.ndarray
    global_overlap: torch.Tensor
    global_jaccard: torch.Tensor
    overlap: torch.Tensor


def compute(cfg: StatsParams, sae_dir: Path, out: files.StatsFiles, block: int | None = None) -> Computed:
    """The statistics of the SAE in `sae_dir` on the CLS inputs of `block` (None: the final
    block), written to `out`; returns what `run` draws the final block's figures from."""
    clean_outputs(out.stats, out.details)
    sae = load_sae(sae_dir).to("cpu").eval()
    train, test = read_embeddings(TRAIN, block), read_embeddings(TEST, block)
    class_names = train.class_names
    same_classes(test.class_names, TEST, class_names, TRAIN, rerun="extract")
    if cfg.top_k > sae.n_latents:  # a set larger than the dictionary makes |A ∩ B| / K meaningless
        raise ParamsError(f"stats.top_k = {cfg.top_k}: must be <= the SAE's number of latents ({sae.n_latents}, {sae_dir})")
    split_stats = {name: _encode(sae, table, path, len(class_names), cfg.batch_size, sae_dir)
                   for name, table, path in (("train", train, TRAIN), ("test", test, TEST))}

    n_latents, top_k = sae.n_latents, cfg.top_k
    sets = {name: (st.top_set(s.freq_all, top_k), st.top_sets(s.freq_class, top_k)) for name, s in split_stats.items()}
    train_stats = split_stats["train"]
    global_set, class_sets = sets["train"]
    overlap, jaccard = st.overlap_matrix(class_sets, n_latents, top_k)
    g_overlap, g_jaccard = st.global_vs_class(global_set, class_sets, n_latents, top_k)

    _write_latents(out.latents, split_stats, class_names, top_k)
    write_top_sets(out.top_sets, TopSets(
        top_k=top_k, n_latents=n_latents, class_names=class_names, global_set=global_set.tolist(),
        per_class={name: s.tolist() for name, s in zip(class_names, class_sets)},
        mean_active_value=train_stats.mean_active_all.tolist(),
    ))

    test_summary = SplitSummary(**_summary(split_stats["test"], *sets["test"], top_k),
                                **_stability(sets["train"], sets["test"], n_latents, top_k))
    record = StatsRecord(
        **_summary(train_stats, global_set, class_sets, top_k), test=test_summary,
        class_overlap_offdiag_mean=_r(_offdiag_mean(overlap)), related=_related(overlap, jaccard, class_names, cfg.related),
        top_k=top_k, n_latents=n_latents, n_classes=len(class_names),
    )
    write_stats_record(out.details, record)
    log.info("global vs class overlap %.4f (Jaccard %.4f); %d of %d latents alive; mean L0 %.2f",
             record.overlap_global_vs_class, record.jaccard_global_vs_class, record.alive_latents, n_latents, record.mean_l0)
    return Computed(record, class_names, train_stats.freq_all.numpy(), g_overlap, g_jaccard, overlap)


def _encode(sae: SparseAutoencoder, table: EmbeddingTable, path: Path, n_classes: int, batch_size: int,
            sae_dir: Path) -> st.LatentStats:
    same_width(table.dim, path, sae.dim, sae_dir / "config.json", rerun="train_sae")
    labels_in_range(table.labels, path, n_classes)
    return st.encode_stats(sae.encode_sparse, table.x, table.labels, sae.n_latents, n_classes, batch_size, desc=f"encode {path.stem}")


def _r(x: float) -> float:
    return rounded(float(x))


def _summary(stats: st.LatentStats, global_set: torch.Tensor, class_sets: list[torch.Tensor], top_k: int) -> dict[str, Any]:
    overlap, jaccard = st.global_vs_class(global_set, class_sets, stats.n_latents, top_k)
    alive = int(stats.alive.sum())
    return {
        "overlap_global_vs_class": _r(overlap.mean()),
        "jaccard_global_vs_class": _r(jaccard.mean()),
        "alive_latents": alive,
        "alive_fraction": _r(alive / stats.n_latents),
        "mean_l0": _r(stats.mean_l0),
        "n_samples": stats.n_samples,
    }


def _stability(train_sets: tuple, test_sets: tuple, n_latents: int, top_k: int) -> dict[str, float]:
    """How far a split's sets agree with the train sets (|A_train ∩ A_test| / K)."""
    global_overlap, _ = st.set_overlap(train_sets[0], test_sets[0], top_k)
    class_overlap, _ = st.paired_overlap(train_sets[1], test_sets[1], n_latents, top_k)
    return {"global_set_train_overlap": _r(global_overlap), "class_set_train_overlap": _r(class_overlap.mean())}


def _offdiag_mean(matrix: torch.Tensor) -> float:
    c = matrix.shape[0]
    if c < 2:
        return 0.0
    return float((matrix.sum() - matrix.diagonal().sum()) / (c * (c - 1)))


def _related(overlap: torch.Tensor, jaccard: torch.Tensor, class_names: list[str], n: int) -> dict[str, list[RelatedClass]]:
    indices, values = st.most_related(overlap, n)
    return {
        name: [RelatedClass(name=class_names[j], overlap=_r(v), jaccard=_r(jaccard[i, j]))
               for j, v in zip(indices[i].tolist(), values[i].tolist())]
        for i, name in enumerate(class_names)
    }


def _rows(split: str, name: str, class_id: int, freq: torch.Tensor, mean: torch.Tensor,
          count: torch.Tensor, rank: torch.Tensor) -> dict[str, np.ndarray]:
    """One group's rows (latents that fire), in rank order."""
    order = st.frequency_order(freq)
    order = order[freq[order] > 0]
    n = len(order)
    return {
        "split": np.full(n, split, dtype=object),
        "class": np.full(n, name, dtype=object),
        "class_id": np.full(n, class_id, dtype=np.int32),
        "latent": order.numpy().astype(np.int32),
        "frequency": freq[order].numpy(),
        "mean_activation": mean[order].numpy(),
        "count": count[order].numpy().astype(np.int64),
        "rank": rank[order].numpy().astype(np.int32),
    }


def _write_latents(path: Path, split_stats: dict[str, st.LatentStats], class_names: list[str], top_k: int) -> None:
    groups = []
    for split, s in split_stats.items():
        freq_all, freq_class = s.freq_all, s.freq_class
        groups.append(_rows(split, ALL, -1, freq_all, s.mean_active_all, s.fire_count_all, st.frequency_rank(freq_all)))
        rank_class, mean_class = st.frequency_rank(freq_class), s.mean_active_class
        for c, name in enumerate(class_names):
            groups.append(_rows(split, name, c, freq_class[c], mean_class[c], s.fire_count_class[c], rank_class[c]))
    columns = {field.name: np.concatenate([g[field.name] for g in groups]) for field in LATENTS_SCHEMA}
    meta = {
        "top_k": top_k,
        "class_names": class_names,
        "n_latents": next(iter(split_stats.values())).n_latents,
        "n_samples": {split: s.n_samples for split, s in split_stats.items()},
        "class_counts": {split: s.class_counts.tolist() for split, s in split_stats.items()},
    }
    schema = with_metadata(LATENTS_SCHEMA, meta)
    table = pa.Table.from_pydict({k: pa.array(v, type=schema.field(k).type) for k, v in columns.items()}, schema=schema)
    with atomic_path(path) as tmp:
        with parquet_writer(tmp, schema) as writer:
            writer.write_table(table, row_group_size=1 << 20)
