"""Class-specific compact models: a plain timm ViT whose gated blocks keep fixed heads.

`pipeline export-pruned --classes A,B` picks, in every gated block, the heads that a majority of
those classes' training images keep, and writes a model in which each such block's attention
*is* those heads: the qkv rows and projection columns of the others are gone, and a block that
keeps no head has no attention left but the projection's bias. There are no decision networks
and no gates: `load_pruned` rebuilds it from timm's architecture and this module alone.

On an image whose gates equal the kept heads in every block, the compact model computes what the
gated model computes (tests/test_pruned.py); on other images it is a different, cheaper model,
and its accuracy on the chosen classes and on all classes is what the export reports.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import GatedViT, create_vit
from pipeline.model.heads import KeptHeadsAttention
from pipeline.storage import load_weights, save_weights

FORMAT = "pruned-vit-1"


def majority_heads(gates: Tensor) -> list[list[int]]:
    """(N, gated blocks, H) eval gates of the chosen images -> per gated block the heads more
    than half of them keep."""
    keep = gates.float().mean(0) > 0.5
    return [torch.nonzero(row).flatten().tolist() for row in keep]


def prune(model: GatedViT, kept: list[list[int]]) -> nn.Module:
    """A copy of the gated model's timm ViT in which gated block b keeps heads kept[b - keep_layers]."""
    if len(kept) != model.depth - model.keep_layers:
        raise PipelineError(f"kept heads given for {len(kept)} blocks; the model gates {model.depth - model.keep_layers}")
    vit = copy.deepcopy(model.vit).eval()
    for offset, heads in enumerate(kept):
        block = vit.blocks[model.keep_layers + offset]
        block.attn = KeptHeadsAttention.from_timm(block.attn, heads)
    return vit


def save_pruned(directory: Path | str, vit: nn.Module, config: ModelConfig, keep_layers: int, kept: list[list[int]], info: dict[str, Any]) -> None:
    save_weights(directory, vit.state_dict(), {
        "format": FORMAT, "model": config.to_json(), "keep_layers": keep_layers, "kept_heads": kept, **info,
    })


def load_pruned(directory: Path | str) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """A compact model written by `export-pruned`: timm's ViT with the kept heads' attention."""
    state, raw = load_weights(directory)
    if raw.get("format") != FORMAT:
        raise PipelineError(f"{directory}/config.json: not a model written by `pipeline export-pruned`")
    config = ModelConfig.from_json(raw["model"])
    vit = create_vit(config.timm_name, config.num_classes, pretrained=False, **asdict(config.shape))
    for offset, heads in enumerate(raw["kept_heads"]):
        block = vit.blocks[raw["keep_layers"] + offset]
        block.attn = KeptHeadsAttention.from_timm(block.attn, heads)  # the shapes; weights loaded below
    vit.load_state_dict(state)
    return vit.eval(), config, raw


def latency(fn, images: Tensor, rounds: int = 5) -> float:
    """Median seconds of one call (after one warm-up)."""
    fn(images)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
