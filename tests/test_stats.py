"""Latent statistics (pipeline/interpret/stats.py), their figures (pipeline/report/plots.py) and the
`latent_stats` stage: exact values on hand-built codes, brute-force equality on random ones."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.interpret import stats as st
from pipeline.report import plots

from conftest import write_embeddings

# --------------------------------------------------------------------------- hand-built codes
# 4 samples, k = 2, 5 latents, 2 classes. Sample 1 selects latent 2 with value 0: not a firing.
VALUES = torch.tensor([[2.0, 1.0], [4.0, 0.0], [3.0, 1.0], [0.5, 6.0]])
INDICES = torch.tensor([[0, 1], [0, 2], [1, 3], [3, 0]])
LABELS = torch.tensor([0, 0, 1, 1])


def hand_stats() -> st.LatentStats:
    return st.firing_stats(VALUES, INDICES, LABELS, n_latents=5, n_classes=2)


def test_hand_built_frequencies_and_means_are_exact():
    s = hand_stats()
    assert s.class_counts.tolist() == [2, 2]
    assert s.fire_count_class.tolist() == [[2, 1, 0, 0, 0], [1, 1, 0, 2, 0]]
    assert s.freq_all.tolist() == [0.75, 0.5, 0.0, 0.5, 0.0]
    assert s.freq_class.tolist() == [[1.0, 0.5, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 1.0, 0.0]]
    assert s.mean_active_all.tolist() == [4.0, 2.0, 0.0, 0.75, 0.0]
    assert s.mean_active_class.tolist() == [[3.0, 1.0, 0.0, 0.0, 0.0], [6.0, 3.0, 0.0, 0.75, 0.0]]
    assert s.alive.tolist() == [True, True, False, True, False]
    assert s.mean_l0 == 7 / 4
    assert s.n_samples == 4


def test_stats_of_batches_add_up_to_stats_of_all():
    parts = [st.firing_stats(VALUES[i : i + 1], INDICES[i : i + 1], LABELS[i : i + 1], 5, 2) for i in range(4)]
    total = st.empty_stats(5, 2)
    for part in parts:
        total = total + part
    whole = hand_stats()
    assert torch.equal(total.fire_count_class, whole.fire_count_class)
    assert torch.equal(total.value_sum_class, whole.value_sum_class)
    assert torch.equal(total.class_counts, whole.class_counts)


def test_class_without_samples_has_zero_frequency():
    s = st.firing_stats(VALUES, INDICES, LABELS, n_latents=5, n_classes=3)
    assert s.freq_class[2].tolist() == [0.0] * 5
    assert s.mean_active_class[2].tolist() == [0.0] * 5


def test_bad_labels_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="labels"):
        st.firing_stats(VALUES, INDICES, torch.tensor([0, 0, 1, 2]), 5, 2)
    with pytest.raises(ValueError, match="latent indices"):
        st.firing_stats(VALUES, INDICES + 3, LABELS, 5, 2)
    with pytest.raises(ValueError, match="shapes"):
        st.firing_stats(VALUES, INDICES[:, :1], LABELS, 5, 2)


def test_ranking_breaks_ties_by_lower_index_and_skips_dead_latents():
    freq = hand_stats().freq_all  # [0.75, 0.5, 0, 0.5, 0]: latents 1 and 3 tie
    assert st.frequency_order(freq).tolist() == [0, 1, 3, 2, 4]
    assert st.frequency_rank(freq).tolist() == [0, 1, 3, 2, 4]
    assert st.top_set(freq, 2).tolist() == [0, 1]
    assert st.top_set(freq, 4).tolist() == [0, 1, 3]  # only 3 latents ever fire: a shorter set
    sets = st.top_sets(hand_stats().freq_class, 2)
    assert [s.tolist() for s in sets] == [[0, 1], [3, 0]]


def test_ranking_is_deterministic_on_many_ties():
    # large enough that an unstable sort reorders equal frequencies
    freq = torch.randint(0, 5, (5000,), generator=torch.Generator().manual_seed(0)).double() / 4
    expected = sorted(range(5000), key=lambda j: (-freq[j].item(), j))
    assert st.frequency_order(freq).tolist() == expected
    assert st.top_set(freq, 100).tolist() == expected[:100]


def test_set_overlap_and_jaccard_examples():
    assert st.set_overlap(torch.tensor([1, 2, 3]), torch.tensor([3, 4]), 4) == (0.25, 0.25)
    assert st.set_overlap(torch.tensor([5, 2]), torch.tensor([2, 5]), 2) == (1.0, 1.0)
    assert st.set_overlap(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3) == (0.0, 0.0)


# ------------------------------------------------------------------------ brute-force checks
def random_code(seed: int, n: int = 60, k: int = 4, n_latents: int = 12, n_classes: int = 4):
    """Distinct indices per row, about a quarter of the values exactly 0 (selected, not firing);
    few latents so that frequency ties are common."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n_latents, generator=g)[:k] for _ in range(n)])
    values = torch.rand(n, k, generator=g).round(decimals=2)
    values[torch.rand(n, k, generator=g) < 0.25] = 0.0
    labels = torch.randint(0, n_classes, (n,), generator=g)
    return values, indices, labels


def brute_stats(values, indices, labels, n_latents, n_classes):
    counts = defaultdict(Counter)  # group -> latent -> samples fired
    sums = defaultdict(lambda: defaultdict(float))
    sizes = Counter()
    for v_row, i_row, y in zip(values.tolist(), indices.tolist(), labels.tolist()):
        sizes[y] += 1
        sizes["all"] += 1
        for v, j in zip(v_row, i_row):
            if v > 0:
                for group in (y, "all"):
                    counts[group][j] += 1
                    sums[group][j] += v
    return counts, sums, sizes


def brute_top(counts: Counter, n_latents: int, top_k: int) -> list[int]:
    ranked = sorted(range(n_latents), key=lambda j: (-counts[j], j))
    return [j for j in ranked if counts[j] > 0][:top_k]


def brute_overlap(a: list[int], b: list[int], top_k: int) -> tuple[float, float]:
    inter, union = len(set(a) & set(b)), len(set(a) | set(b))
    return inter / top_k, (inter / union if union else 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_statistics_sets_and_overlaps_match_brute_force(seed):
    n_latents, n_classes, top_k = 12, 4, 3
    values, indices, labels = random_code(seed, n_latents=n_latents, n_classes=n_classes)
    s = st.firing_stats(values, indices, labels, n_latents, n_classes)
    counts, sums, sizes = brute_stats(values, indices, labels, n_latents, n_classes)

    for j in range(n_latents):
        assert s.freq_all[j].item() == pytest.approx(counts["all"][j] / sizes["all"])
        expected_mean = sums["all"][j] / counts["all"][j] if counts["all"][j] else 0.0
        assert s.mean_active_all[j].item() == pytest.approx(expected_mean)
        for c in range(n_classes):
            assert s.fire_count_class[c, j].item() == counts[c][j]
            expected = sums[c][j] / counts[c][j] if counts[c][j] else 0.0
            assert s.mean_active_class[c, j].item() == pytest.approx(expected)

    global_set = st.top_set(s.freq_all, top_k)
    class_sets = st.top_sets(s.freq_class, top_k)
    brute_global = brute_top(counts["all"], n_latents, top_k)
    brute_class = [brute_top(counts[c], n_latents, top_k) for c in range(n_classes)]
    assert global_set.tolist() == brute_global
    assert [x.tolist() for x in class_sets] == brute_class

    overlap, jaccard = st.overlap_matrix(class_sets, n_latents, top_k)
    for a in range(n_classes):
        for b in range(n_classes):
            o, jac = brute_overlap(brute_class[a], brute_class[b], top_k)
            assert overlap[a, b].item() == pytest.approx(o)
            assert jaccard[a, b].item() == pytest.approx(jac)

    g_overlap, g_jaccard = st.global_vs_class(global_set, class_sets, n_latents, top_k)
    brute_g = [brute_overlap(brute_global, brute_class[c], top_k) for c in range(n_classes)]
    assert g_overlap.tolist() == pytest.approx([o for o, _ in brute_g])
    assert g_jaccard.tolist() == pytest.approx([j for _, j in brute_g])

    related, related_values = st.most_related(overlap, 2)
    for a in range(n_classes):
        others = sorted((b for b in range(n_classes) if b != a), key=lambda b: (-overlap[a, b].item(), b))
        assert related[a].tolist() == others[:2]
        assert related_values[a].tolist() == [overlap[a, b].item() for b in others[:2]]


def test_rank_agrees_with_top_set():
    values, indices, labels = random_code(11)
    freq = st.firing_stats(values, indices, labels, 12, 4).freq_class
    rank = st.frequency_rank(freq)
    for c, members in enumerate(st.top_sets(freq, 5)):
        assert rank[c, members].tolist() == list(range(len(members)))


def test_most_related_clamps_to_other_classes():
    matrix = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.5], [0.2, 0.5, 1.0]], dtype=torch.float64)
    indices, values = st.most_related(matrix, 5)
    assert indices.tolist() == [[1, 2], [2, 0], [1, 0]]
    assert values.tolist() == [[0.2, 0.2], [0.5, 0.2], [0.5, 0.2]]


def test_paired_overlap():
    a = [torch.tensor([0, 1, 2]), torch.tensor([3])]
    b = [torch.tensor([2, 1, 5]), torch.tensor([4])]
    overlap, jaccard = st.paired_overlap(a, b, 6, 3)
    assert overlap.tolist() == pytest.approx([2 / 3, 0.0])
    assert jaccard.tolist() == pytest.approx([2 / 4, 0.0])


def test_encode_stats_batches_equal_one_pass():
    values, indices, labels = random_code(3)
    x = torch.arange(len(labels))  # the fake encoder looks codes up by row number

    def encode(rows):
        return values[rows], indices[rows]

    batched = st.encode_stats(encode, x, labels, 12, 4, batch_size=7)
    whole = st.firing_stats(values, indices, labels, 12, 4)
    assert torch.equal(batched.fire_count_class, whole.fire_count_class)
    assert torch.allclose(batched.value_sum_class, whole.value_sum_class)


# ------------------------------------------------------------------------------------- plots
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plots_are_deterministic_pngs_without_version_metadata(tmp_path):
    matrix = np.random.default_rng(0).random((10, 10))
    names = [f"class_{i}" for i in range(10)]
    for name in ("a", "b"):
        plots.overlap_heatmap(matrix, names, tmp_path / f"heat_{name}.png")
        plots.frequency_histogram(np.r_[np.zeros(5), np.linspace(0.01, 0.9, 40)], tmp_path / f"hist_{name}.png")
    for kind in ("heat", "hist"):
        first = (tmp_path / f"{kind}_a.png").read_bytes()
        assert first.startswith(PNG_MAGIC)
        assert first == (tmp_path / f"{kind}_b.png").read_bytes()
        assert b"Software" not in first and b"matplotlib" not in first
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind


def test_heatmap_handles_100_classes_and_rejects_bad_shapes(tmp_path):
    names = [f"c{i}" for i in range(100)]
    plots.overlap_heatmap(torch.eye(100, dtype=torch.float64), names, tmp_path / "big.png")
    assert (tmp_path / "big.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="class names"):
        plots.overlap_heatmap(np.zeros((3, 3)), names[:2], tmp_path / "bad.png")


# ------------------------------------------------------------------------------------- stage
STAGE_OUTPUTS = [
    "data/stats/latents.parquet",
    "data/stats/top_sets.json",
    "metrics/latent_stats.json",
    "metrics/details/latent_stats.json",
    "metrics/plots/overlap_heatmap.png",
    "metrics/plots/firing_frequency.png",
    "metrics/plots/class_overlap.json",
]


def test_stage_outputs_agree_with_a_direct_computation(tmp_path, monkeypatch):
    from pipeline.params.file import parse_params
    from pipeline.sae.registry import load_sae, save_sae
    from pipeline.sae.topk import TopKSAE
    from pipeline.stages import latent_stats

    monkeypatch.chdir(tmp_path)
    dim, n_latents, k, top_k = 8, 24, 4, 3
    class_names = ["bowl", "plate", "pine_tree"]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, dim)) * 2
    data = {}
    for split, per_class in (("train", 12), ("test", 5)):
        labels = np.repeat(np.arange(3), per_class)
        x = centres[labels] + rng.normal(size=(len(labels), dim)) * 0.5
        write_embeddings(Path(f"data/embeddings/{split}.parquet"), x, labels, class_names, split)
        data[split] = (torch.tensor(x, dtype=torch.float32), torch.tensor(labels))
    torch.manual_seed(0)
    sae = TopKSAE(dim, n_latents, k)
    save_sae(Path("models/sae"), sae, {})
    params = parse_params({"data": {}, "model": {}, "finetune": {}, "extract": {}, "sae": {}, "interpret": {}, "steer": {}, "ceiling": {}, "latency": {},
                           "stats": {"top_k": top_k, "related": 2, "batch_size": 7}})

    latent_stats.run(params.stats)
    first = {p: Path(p).read_bytes() for p in STAGE_OUTPUTS}
    latent_stats.run(params.stats)
    assert {p: Path(p).read_bytes() for p in STAGE_OUTPUTS} == first  # byte-identical rerun

    metrics = json.loads(Path("metrics/details/latent_stats.json").read_text())
    headline = json.loads(Path("metrics/latent_stats.json").read_text())
    assert headline == {"overlap": metrics["overlap_global_vs_class"], "jaccard": metrics["jaccard_global_vs_class"]}
    top = json.loads(Path("data/stats/top_sets.json").read_text())
    rows = pq.read_table("data/stats/latents.parquet").to_pylist()
    assert pq.read_schema("data/stats/latents.parquet").field("class_id").type == pa.int32()

    # direct brute force from the SAE's codes of the train split
    loaded = load_sae(Path("models/sae"))
    with torch.no_grad():
        values, indices = loaded.encode_topk(data["train"][0])
    counts, sums, sizes = brute_stats(values, indices, data["train"][1], n_latents, 3)
    train_all = [r for r in rows if r["split"] == "train" and r["class"] == "__all__"]
    assert {r["latent"]: r["count"] for r in train_all} == dict(counts["all"])
    assert [r["rank"] for r in train_all] == list(range(len(train_all)))
    assert metrics["alive_latents"] == len(train_all)
    assert metrics["mean_l0"] == pytest.approx(sum(r["frequency"] for r in train_all), abs=1e-6)
    assert metrics["top_k"] == top_k and metrics["n_latents"] == n_latents
    assert metrics["alive_latents"] > top_k and len(top["global"]) == top_k  # a non-trivial case

    # the sets follow from the rows' ranks, and equal the brute-force sets
    def set_from_rows(split, name):
        group = [r for r in rows if r["split"] == split and r["class"] == name]
        return [r["latent"] for r in sorted(group, key=lambda r: r["rank"]) if r["rank"] < top_k]

    assert top["global"] == set_from_rows("train", "__all__") == brute_top(counts["all"], n_latents, top_k)
    for c, name in enumerate(class_names):
        assert top["per_class"][name] == set_from_rows("train", name) == brute_top(counts[c], n_latents, top_k)
        class_rows = [r for r in rows if r["split"] == "train" and r["class"] == name]
        assert all(r["class_id"] == c for r in class_rows)
        assert {r["latent"]: r["frequency"] for r in class_rows} == pytest.approx(
            {j: n / sizes[c] for j, n in counts[c].items()})
    means = {r["latent"]: r["mean_activation"] for r in train_all}
    assert top["mean_active_value"] == pytest.approx([means.get(j, 0.0) for j in range(n_latents)])
    assert top["class_names"] == class_names

    # headline overlaps recomputed from the rows
    pairs = [brute_overlap(top["global"], top["per_class"][name], top_k) for name in class_names]
    assert metrics["overlap_global_vs_class"] == pytest.approx(np.mean([o for o, _ in pairs]), abs=1e-6)
    assert metrics["jaccard_global_vs_class"] == pytest.approx(np.mean([j for _, j in pairs]), abs=1e-6)
    per_class = json.loads(Path("metrics/plots/class_overlap.json").read_text())
    assert [r["class"] for r in per_class] == class_names
    assert [r["global_overlap"] for r in per_class] == pytest.approx([o for o, _ in pairs], abs=1e-6)
    for name, related in metrics["related"].items():
        assert len(related) == 2 and name not in [r["class"] for r in related]
        for r in related:
            o, j = brute_overlap(top["per_class"][name], top["per_class"][r["class"]], top_k)
            assert r["overlap"] == pytest.approx(o, abs=1e-6) and r["jaccard"] == pytest.approx(j, abs=1e-6)

    # the test split is reported separately, from its own codes
    test_all = [r for r in rows if r["split"] == "test" and r["class"] == "__all__"]
    assert metrics["test"]["alive_latents"] == len(test_all)
    assert metrics["test"]["n_samples"] == 15 and metrics["n_samples"] == 36
    assert 0.0 <= metrics["test"]["class_set_train_overlap"] <= 1.0
