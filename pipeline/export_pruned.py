"""`pipeline export-pruned --classes A,B`: a compact model for a group of classes, beside the
gated model it came from (accuracy on those classes and on all, GFLOPs, measured latency).

Heads are chosen on the training split (a majority of the classes' training images keep them,
block by block) and everything reported is on the test split. Reads the finished `finetune`
and `download` outputs; writes `<out>/model.safetensors`, `<out>/config.json`, `<out>/export.json`.

`heads="headline"` takes the heads from the steering headline instead: at each class's selected
alpha (chosen on the selection split, `steer.select_on`), the heads a majority of those classes'
selection-split images keep when their own latents are steered, in the final block for a
final-block sweep and in every gated block for a multi-block one (`steer.blocks`: a steered
block changes the later blocks' gates too, so all of them come from the sweep's rows). On an
image whose steered gates are those heads the compact model computes what the steered gated
model computes, with no SAE and no decision network; the export reports the steered model's
test accuracy beside the compact model's. The
sweep must have run on these weights (steer records their SHA-256); a stale one is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.data.dataset import load_images
from pipeline.errors import PipelineError
from pipeline.layout import download, finetune, steer
from pipeline.model.config import ModelConfig
from pipeline.model.flops import flop_model
from pipeline.model.gated_vit import GatedViT, load_gated_vit
from pipeline.model.pruned import latency, majority_heads, prune, save_pruned
from pipeline.steering.results import read_block_rows, read_details, read_results
from pipeline.steering.strategies import PER_CLASS
from pipeline.storage import rounded, weights_sha256, write_json

HEAD_CHOICES = ("majority", "headline")
log = logging.getLogger(__name__)


def _batches(images: torch.Tensor, size: int):
    for start in range(0, len(images), size):
        yield images[start:start + size]


@torch.no_grad()
def gated_outputs(model: GatedViT, config: ModelConfig, images: torch.Tensor, batch_size: int,
                  head_path: str = "masked") -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, gates (N, G, H)) of the gated model on `head_path`."""
    model.head_path = head_path
    preds, gates = [], []
    for batch in _batches(images, batch_size):
        out = model(config.preprocess(batch))
        preds.append(out.logits.argmax(-1))
        gates.append(out.gates)
    return torch.cat(preds), torch.cat(gates)


@torch.no_grad()
def predictions(vit: torch.nn.Module, config: ModelConfig, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([vit(config.preprocess(batch)).argmax(-1) for batch in _batches(images, batch_size)])


def headline_heads(classes: list[str], n_heads: int, model_sha256: str, final_block: int) -> tuple[dict[int, list[int]], dict[str, Any]]:
    """Heads at the steering headline for `classes`, per block the sweep reports: the heads kept
    by a majority of their selection-split images at each class's selected alpha (strategy
    per_class, rates pooled over the classes by image count), and what the steered gated model
    scored on test at those alphas. A final-block sweep gives the final block's heads; a
    multi-block sweep (`steer.blocks`) every gated block's, from data/steer/blocks.parquet.
    Refuses a sweep that ran on other weights than `model_sha256` (the model being exported)."""
    if not steer.DETAILS.exists() or not steer.RESULTS.exists():
        raise PipelineError(f"{steer.DETAILS} or {steer.RESULTS} is missing: run `dvc repro steer` first")
    details = read_details(steer.DETAILS)
    swept_on = details.settings.model_sha256
    if swept_on is None:
        log.warning("%s does not say which weights the sweep ran on (written before steer recorded it)", steer.DETAILS)
    elif swept_on != model_sha256:
        raise PipelineError(f"{steer.DETAILS}: the sweep ran on other weights than {finetune.MODEL} "
                            f"(sha256 {swept_on[:12]}… vs {model_sha256[:12]}…); rerun `dvc repro steer`")
    headline = details.per_class_headline
    if headline is None:
        raise PipelineError(f"{steer.DETAILS} has no per-class headline ({PER_CLASS} not among steer.strategies)")
    alphas, split = headline.alpha, headline.selected_on
    gated = details.settings.gated_blocks
    if gated is None:  # a final-block sweep: results.parquet is the final block's
        all_rows = [{**r, "block": final_block} for r in read_results(steer.RESULTS)]
        blocks = [final_block]
    else:
        all_rows, blocks = read_block_rows(steer.BLOCKS), gated
    rows = [r for r in all_rows if r["strategy"] == PER_CLASS and r["class"] in classes and r["alpha"] == alphas.get(r["class"])]

    def pooled(on: str, block: int) -> tuple[int, list[float], float]:
        chosen = [r for r in rows if r["split"] == on and r["n"] and r["block"] == block]
        n = sum(r["n"] for r in chosen)
        if not n:
            raise PipelineError(f"{steer.RESULTS}: no {on} rows for {classes} at their headline alphas; rerun steer")
        keep = [sum(r["n"] * r[f"keep_h{h}"] for r in chosen) / n for h in range(n_heads)]
        return n, keep, sum(r["n"] * r["accuracy"] for r in chosen) / n

    heads, info = {}, {"keep_rates_on_selection_split": {}, "head_usage_on_test": {}}
    for block in blocks:
        n_sel, keep_sel, _ = pooled(split, block)
        n_test, keep_test, acc_test = pooled("test", block)
        heads[block] = [h for h in range(n_heads) if keep_sel[h] > 0.5]
        info["keep_rates_on_selection_split"][f"block{block}"] = keep_sel
        info["head_usage_on_test"][f"block{block}"] = sum(keep_test) / n_heads
    return heads, {
        "alphas": {c: alphas[c] for c in classes},
        "selected_on": split,
        "steered_blocks": details.settings.blocks,
        "images": {split: n_sel, "test": n_test},
        "steered_gated_on_test": {"accuracy_chosen_classes": acc_test,
                                  "head_usage": sum(info["head_usage_on_test"].values()) / len(blocks)},
        **info,
    }


def export(classes: list[str], out: Path, batch_size: int = 256, latency_rounds: int = 5, heads: str = "majority") -> dict[str, Any]:
    if heads not in HEAD_CHOICES:
        raise PipelineError(f"--heads {heads!r}: choose {' or '.join(HEAD_CHOICES)}")
    if not (finetune.MODEL / "model.safetensors").exists() or not download.dataset_split("test").exists():
        raise PipelineError(f"{finetune.MODEL} or {download.DATASET} is missing: run `dvc repro finetune` first")
    model, config = load_gated_vit(finetune.MODEL)
    unknown = [c for c in classes if c not in config.class_names]
    if unknown or not classes:
        raise PipelineError(f"unknown class(es) {unknown or classes}; this model's classes include {config.class_names[:8]}")
    ids = torch.tensor([config.class_names.index(c) for c in classes])
    train, test = load_images(download.dataset_split("train")), load_images(download.dataset_split("test"))
    chosen_train = torch.isin(train.labels, ids)
    _, train_gates = gated_outputs(model, config, train.images[chosen_train], batch_size)
    kept = majority_heads(train_gates)
    steered = None
    if heads == "headline":
        by_block, steered = headline_heads(classes, model.num_heads, weights_sha256(finetune.MODEL), model.depth - 1)
        for block, block_heads in by_block.items():
            kept[block - model.keep_layers] = block_heads
    compact = prune(model, kept)

    dense_pred, test_gates = gated_outputs(model, config, test.images, batch_size)
    skipping_pred, _ = gated_outputs(model, config, test.images, batch_size, head_path="skipping")
    pruned_pred = predictions(compact, config, test.images, batch_size)
    chosen = torch.isin(test.labels, ids)

    def accuracy(pred: torch.Tensor, rows: torch.Tensor) -> float:
        return float((pred[rows] == test.labels[rows]).double().mean())

    fm = flop_model(model)
    decision = 2.0 * model.vit.embed_dim * model.num_heads * (model.depth - model.keep_layers)  # gone from the compact model
    kept_counts = [float(model.num_heads)] * model.keep_layers + [float(len(k)) for k in kept]
    gated_kept = [float(model.num_heads)] * model.keep_layers + test_gates[chosen].sum(-1).double().mean(0).tolist()
    sample = test.images[chosen][:32]
    def gated_on(path: str):
        def forward(t: torch.Tensor):
            model.head_path = path
            return model(t)
        return forward

    timings = {}
    for batch in (32, 1):
        x = config.preprocess(sample[:batch])
        timings[batch] = {"gated": latency(gated_on("masked"), x, latency_rounds),
                          "gated_skipping": latency(gated_on("skipping"), x, latency_rounds),
                          "compact": latency(compact, x, latency_rounds)}
    pattern_match = (test_gates[chosen] == torch.stack([torch.isin(torch.arange(model.num_heads), torch.tensor(k, dtype=torch.long))
                                                        for k in kept]).to(test_gates.dtype)).all(-1).all(-1)
    result = {
        "classes": classes,
        "kept_heads": {f"block{model.keep_layers + i}": k for i, k in enumerate(kept)},
        "heads_kept": int(sum(len(k) for k in kept)),
        "heads_gated": (model.depth - model.keep_layers) * model.num_heads,
        "test_images": {"chosen_classes": int(chosen.sum()), "all": len(test.labels)},
        "accuracy": {
            "gated": {"chosen_classes": accuracy(dense_pred, chosen), "all": accuracy(dense_pred, torch.ones_like(chosen))},
            "gated_skipping": {"chosen_classes": accuracy(skipping_pred, chosen), "all": accuracy(skipping_pred, torch.ones_like(chosen))},
            "compact": {"chosen_classes": accuracy(pruned_pred, chosen), "all": accuracy(pruned_pred, torch.ones_like(chosen))},
        },
        "chosen_images_whose_gates_match_the_kept_heads": float(pattern_match.double().mean()),
        "gflops": {
            "dense": (fm.dense - decision) / 1e9,
            "gated_if_heads_were_skipped": fm.image(gated_kept) / 1e9,
            "compact": (fm.image(kept_counts) - decision) / 1e9,
        },
        "latency_ms": {f"batch{b}": {k: 1000 * v for k, v in t.items()} for b, t in timings.items()},
        "latency_note": (f"median of {latency_rounds} calls on {torch.get_num_threads()} CPU threads; gated = the masked path "
                         "(every head computed), gated_skipping = the head-skipping path (only each image's kept heads)"),
        "heads_chosen_on": _chosen_on(steered, sorted(by_block) if steered else []),
        "reported_on": "test",
    }
    if steered is not None:
        result["steering_headline"] = steered
    save_pruned(out, compact, config, model.keep_layers, kept, {"classes": classes})
    write_json(out / "export.json", rounded(result))
    return result


def _chosen_on(steered: dict[str, Any] | None, headline_blocks: list[int]) -> str:
    """Where the kept heads were chosen: the training majority, the headline's split, or both
    (a final-block headline leaves the earlier gated blocks to the training majority; a
    multi-block one, `steered_blocks`, gives every gated block's)."""
    if steered is None:
        return "train"
    if steered.get("steered_blocks"):
        return f"{steered['selected_on']} (every gated block: steering headline)"
    return f"train (blocks {', '.join(map(str, headline_blocks))}: steering headline, {steered['selected_on']})"


def describe(result: dict[str, Any]) -> str:
    acc, fl, lat = result["accuracy"], result["gflops"], result["latency_ms"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    steered = result.get("steering_headline")
    chosen = "majority of their training images"
    if steered:
        alphas = ", ".join(f"{c} {a:+g}" for c, a in steered["alphas"].items())
        headline = f"the steering headline's, at alphas {alphas}, majority on {steered['selected_on']}"
        # a multi-block sweep gives every gated block's heads; a final-block one the final block's only
        chosen = f"every gated block: {headline}" if steered.get("steered_blocks") else f"{chosen}; final block: {headline}"
    lines = [
        f"classes {', '.join(result['classes'])}: {result['heads_kept']} of {result['heads_gated']} gated heads kept "
        f"({chosen}); " + "; ".join(f"{b}: {k}" for b, k in result["kept_heads"].items()),
        "| model | accuracy, these classes | accuracy, all classes | GFLOPs per image | latency batch 32 | batch 1 |",
        "|---|---|---|---|---|---|",
        f"| gated, masked path | {pct(acc['gated']['chosen_classes'])} | {pct(acc['gated']['all'])} | {fl['dense']:.4g} | "
        f"{lat['batch32']['gated']:.1f} ms | {lat['batch1']['gated']:.2f} ms |",
        f"| gated, head-skipping path | {pct(acc['gated_skipping']['chosen_classes'])} | {pct(acc['gated_skipping']['all'])} | "
        f"{fl['gated_if_heads_were_skipped']:.4g} | "
        f"{lat['batch32']['gated_skipping']:.1f} ms | {lat['batch1']['gated_skipping']:.2f} ms |",
    ]
    if steered:
        on_test = steered["steered_gated_on_test"]
        lines.append(f"| gated, steered at those alphas (own class's latents) | {pct(on_test['accuracy_chosen_classes'])} | - | "
                     "usage " + ", ".join(f"{b} {u:.2f}" for b, u in steered["head_usage_on_test"].items()) + " | - | - |")
    lines += [
        f"| compact | {pct(acc['compact']['chosen_classes'])} | {pct(acc['compact']['all'])} | {fl['compact']:.4g} | "
        f"{lat['batch32']['compact']:.1f} ms | {lat['batch1']['compact']:.2f} ms |",
        f"{pct(result['chosen_images_whose_gates_match_the_kept_heads'])} of these classes' test images have exactly the kept heads' "
        "(unsteered) gates (on those the gated and compact models agree).",
    ]
    return "\n".join(lines)
