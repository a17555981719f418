"""metrics/report.md: what the page says, from hand-made inputs (no pipeline run)."""

from __future__ import annotations

from pipeline.interpret.records import StatsRecord
from pipeline.model.config import ModelConfig, ModelShape
from pipeline.model.record import TrainingRecord
from pipeline.report.render import Ceiling, ReportInputs, render_report
from pipeline.steering.headline import ClassHeadline
from pipeline.steering.results import SteerDetails
from pipeline.storage import from_json_value

from conftest import steer_details as steer_metrics

HEADS = ["h0", "h1", "h2", "h3", "h4", "h5"]
FINETUNE = {"test_accuracy": 0.372, "head_usage": 0.561, "head_usage_per_block": [1.0, 0.75, 0.561],
            "head_usage_per_head": [0.5] * 6, "epochs": 3, "num_classes": 3}
SAE = {"n_latents": 768, "k": 32, "test": {"fvu": 0.043, "mse": 0.0123, "l0": 32.0, "dead_fraction": 0.004}}
STATS = StatsRecord(overlap_global_vs_class=0.41, jaccard_global_vs_class=0.26, alive_latents=765, alive_fraction=0.996,
                    mean_l0=32.0, n_samples=900)


def config(embed_dim: int = 96, depth: int = 6) -> ModelConfig:
    return ModelConfig(
        timm_name="vit_small_patch16_224", shape=ModelShape(32, 4, embed_dim, depth, 6), num_classes=3,
        class_names=["apple", "bowl", "plate"], keep_layers=1, gate_bias_init=2.0, tau=5.0,
        mean=[0.5] * 3, std=[0.5] * 3,
    )


def headline(class_id: int, name: str, base: tuple[float, float], steered: tuple[float, float], heads: list[int], alpha: float) -> ClassHeadline:
    return ClassHeadline(class_id, name, alpha, base[0], base[1], [0, 1, 2, 3], steered[0], steered[1], heads, [0.0] * 6)


def render(params, steer: dict, rows: list[ClassHeadline], finetune: dict = FINETUNE, model: ModelConfig | None = None) -> str:
    """The page from these inputs; `steer` goes through the details file's typed reader."""
    return render_report(ReportInputs(params=params, config=model or config(), finetune=from_json_value(TrainingRecord, finetune), sae=SAE, stats=STATS,
                                      steer=from_json_value(SteerDetails, steer), headline=rows, head_names=HEADS))


def test_the_paper_rows_show_our_class_beside_the_paper_and_say_when_a_class_is_missing(tiny_params):
    params = tiny_params(steer={"top_classes": 1, "strategies": ["per_class", "global", "random"], "null_draws": 20})
    rows = [
        headline(0, "apple", (0.5, 0.9), (0.5, 0.2), [1], 4.0),
        headline(1, "bowl", (0.11, 0.67), (0.12, 0.60), [2, 5], 4.0),
        headline(2, "plate", (0.3, 0.5), (0.3, 0.5), [0, 1, 2], 0.0),
    ]
    report = render(params, steer_metrics(params.steer.strategies, True), rows)
    assert "| bowl | 76% -> 82%, usage 0.72 -> 0.33 (h2, h5) | 11% -> 12%, usage 0.67 -> 0.60 (h2, h5) |" in report
    assert "| pine_tree | 79% -> 84%, usage 0.93 -> 0.35 (h2, h3) | class not in this data set |" in report
    assert "| overlap global vs class | 0.1641 | 0.4100 (\\|A ∩ B\\| / K), 0.2600 (Jaccard) |" in report
    # the headline table: the top class by usage reduction, then the paper's classes
    table = report.split("## Per-class steering (headline)")[1].split("## Strategies")[0]
    assert table.index("| apple | 50% / 0.90 (h0, h1, h2, h3) | 50% / 0.20 (h1) | +4 | -0.700 | - |") < table.index("| bowl |")
    assert "| plate |" not in table
    assert "chosen on the validation split\n(150 images) and reported on the test split (300 images)" in report
    assert "| class set of the true class (oracle) | -0.054 [-0.070, -0.040] | +0.5 [-1.0, +2.0] | 2 of 3 |" in table
    assert "| class set of the predicted class (deployable) | -0.030 [-0.050, -0.010] | -1.0 [-3.0, +1.0] | 1 of 3 |" in table
    # the accuracy interval reaches below the tolerance (0): no "no accuracy cost" claim
    assert "cannot claim the reduction comes at no accuracy cost" in table and "no accuracy cost at this" not in table
    assert "1 of 3 classes lose more heads than the null's central interval allows" in table
    assert "strategies per_class, global, random (20 random draws)" in report
    assert "| random | +4 | 37.0% [36.0, 38.0] | 0.500 [0.490, 0.510] | - |" in report
    assert "smaller than the paper's" in report and "plots/head_keep_heatmap.png" in report


def test_no_accuracy_cost_is_claimed_only_when_the_interval_allows_it(tiny_params):
    params = tiny_params(steer={"strategies": ["per_class"]})
    rows = [headline(0, "apple", (0.5, 0.9), (0.5, 0.2), [1], 4.0)]
    report = render(params, steer_metrics(["per_class"], True, acc_ci=(0.0, 0.02)), rows)
    assert "stays at or above +0.0 points: no accuracy cost at this confidence" in report
    assert "cannot claim" not in report


def test_compute_is_reported_from_the_gates_when_it_exists(tiny_params):
    params = tiny_params(steer={"strategies": ["per_class"]})
    finetune = {**FINETUNE, "gflops": 0.05, "gflops_dense": 0.08, "gflops_fraction": 0.625}
    steer = steer_metrics(["per_class"], True)
    for curve in steer["strategies"].values():
        curve["gflops"] = [0.051, 0.05, 0.049]
    rows = [headline(0, "apple", (0.5, 0.9), (0.5, 0.2), [1], 4.0)]
    report = render(params, steer, rows, finetune)
    assert "0.05 GFLOPs, 62% of the dense model's 0.08; the final block's attention is 5.0% of the dense model" in report
    assert "In compute: -0.001 GFLOPs per image, -2.0% of the unsteered model's 0.05" in report
    assert "| per_class | +4 | 37.0% [36.0, 38.0] | 0.500 [0.490, 0.510] | 0.049 |" in report


def test_without_the_per_class_strategy_there_is_no_headline_and_no_headline_figures(tiny_params):
    params = tiny_params(steer={"strategies": ["global"]})
    report = render(params, steer_metrics(["global"], False), [])
    assert "(per_class is not among `steer.strategies`: no headline.)" in report
    assert "| bowl | 76% -> 82%, usage 0.72 -> 0.33 (h2, h5) | class not in this data set |" in report
    assert "head_keep_heatmap" not in report and "steer_class_usage" not in report
    assert "strategies global, tolerance" in report  # no draws mentioned: no drawn strategy runs
    assert "| per_class |" not in report


def test_a_run_at_the_papers_scale_on_real_data_says_its_numbers_are_comparable(tiny_params):
    params = tiny_params(data={"source": "imagefolder", "path": "somewhere"}, steer={"strategies": ["global"]})
    report = render(params, steer_metrics(["global"], False), [], model=config(embed_dim=384, depth=12))
    assert "This run has the paper's architecture" in report and "smaller than the paper's" not in report


def _ceiling() -> Ceiling:
    from pipeline.steering.ceiling import CeilingClass, CeilingDetails, CeilingSettings, CeilingSummary

    summary = CeilingSummary(mean_usage_change=-0.4, mean_usage_change_ci=[-0.42, -0.38], mean_accuracy_change=0.0,
                             mean_accuracy_change_ci=[-0.01, 0.01], classes_with_reduction=3, classes_with_reduction_ci_below_zero=3,
                             selected_on="val", heads={})
    settings = CeilingSettings(search="exhaustive", patterns_per_class=64, accuracy_tolerance=0.0, select_on="val", bootstrap=1000,
                               confidence=0.95, images={"val": 150, "test": 300}, stored_predictions_agree={"test": 1.0})
    classes = [CeilingClass(c, name, 0, [], 0.4, 0.4, 0.5, 0.4, 0.1) for c, name in enumerate(["apple", "bowl", "plate"])]
    return Ceiling(details=CeilingDetails(summary=summary, settings=settings, baseline={}), classes=classes)


def _control(usage: float, ci: list[float], below: int) -> dict:
    return {"mean_usage_change": usage, "mean_usage_change_ci": ci, "mean_accuracy_change": 0.0, "mean_accuracy_change_ci": [-0.01, 0.01],
            "classes_with_reduction": 2, "classes_with_reduction_ci_below_zero": 1, "alpha": {}, "selected_on": "val",
            "null": {"classes_below": below, "classes_above": 0, "classes": 3, "per_alpha": {}}}


def test_how_much_control_lists_every_control_with_its_share_of_the_ceiling_and_says_which_wins(tiny_params):
    def page(class_usage: float, class_ci: list[float]) -> str:
        steer = steer_metrics(["per_class", "random_direction", "class_direction", "gate_direction"], with_headline=True)
        steer["controls"] = {"random_direction": {**_control(-0.01, [-0.03, 0.01], 0), "null": None,
                                                  "draws": {"usage_change": [-0.01, -0.07, -0.1, -0.02], "accuracy_change": [0.0, -0.01, 0.0, 0.01]}},
                             "class_direction": _control(class_usage, class_ci, 2),
                             "gate_direction": _control(-0.3, [-0.32, -0.28], 3)}
        return render_report(ReportInputs(params=tiny_params(), config=config(), finetune=from_json_value(TrainingRecord, FINETUNE),
                                          sae=SAE, stats=STATS, steer=from_json_value(SteerDetails, steer),
                                          headline=[headline(0, "bowl", (0.8, 0.7), (0.8, 0.5), [1], 4.0)], head_names=HEADS,
                                          ceiling=_ceiling()))

    text = page(-0.02, [-0.03, -0.01])  # the SAE's -0.054 [-0.07, -0.04] lies below the class direction's interval
    assert "| SAE latents of the true class (oracle) | -0.054 [-0.070, -0.040] | +0.5 [-1.0, +2.0] | 14% | 2 of 3 | 1 of 3 |" in text
    assert "| control: the class's mean embedding direction (no SAE) | -0.020 [-0.030, -0.010] | +0.0 [-1.0, +1.0] | 5% | 2 of 3 | 2 of 3 |" in text
    assert "| control: the gate-closing direction (closes heads fastest) | -0.300 [-0.320, -0.280] | +0.0 [-1.0, +1.0] | 75% |" in text
    assert ("| control: a random direction per class (the controls' null) | -0.050 (draws -0.100 to -0.010) | +0.0 (draws -1.0 to +1.0) "
            "| 12% | 2 of 3 (draw 0) | - |") in text
    assert "Of 4 random directions of the same norm, each selected per class alike, 2 lower usage more than the SAE latents (-0.054" in text
    assert "the SAE's class latents give control beyond the class's mean direction" in text
    assert "contrary to the paper's story" in page(-0.2, [-0.25, -0.15])
    assert "the intervals overlap: at this size the two cannot be told apart" in page(-0.05, [-0.08, -0.02])


def test_the_configuration_names_the_sae_architecture(tiny_params):
    steer = steer_metrics(["per_class"], with_headline=True)
    rows = [headline(0, "bowl", (0.8, 0.7), (0.8, 0.5), [1], 4.0)]
    for details, expected in (({**SAE, "architecture": "jumprelu", "k": None}, "| SAE | JumpReLU, 768 latents, L0 set by its learned thresholds,"),
                              ({**SAE, "architecture": "batchtopk"}, "| SAE | BatchTopK, 768 latents, k = 32 on average over a batch,"),
                              (SAE, "| SAE | TopK, 768 latents, k = 32,")):
        text = render_report(ReportInputs(params=tiny_params(), config=config(), finetune=from_json_value(TrainingRecord, FINETUNE),
                                          sae=details, stats=STATS, steer=from_json_value(SteerDetails, steer), headline=rows,
                                          head_names=HEADS))
        assert expected in text, expected
