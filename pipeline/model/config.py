"""The trained model's description, stored as models/vit/config.json beside its weights:
enough to rebuild it without timm's hub and to feed it images. Kept apart from the model's
code so that a reader of the config (the report) does not depend on the model's code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.storage import CONFIG_FILE, read_json


@dataclass(frozen=True)
class ModelShape:
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a trained gated ViT without timm's hub, and to feed it
    images: stored as models/vit/config.json next to the weights."""

    timm_name: str
    shape: ModelShape
    num_classes: int
    class_names: list[str]
    keep_layers: int
    gate_bias_init: float
    tau: float
    mean: list[float]
    """Per-channel normalisation of the model's inputs (timm's pretrained config)."""
    std: list[float]

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (B, C, H, W) -> normalised float at the model's input size."""
        return preprocess(images, self.shape.img_size, self.mean, self.std)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelConfig:
        """The config of a saved model; a missing or malformed field raises KeyError/TypeError."""
        fields = {**raw, "shape": ModelShape(**raw["shape"])}
        return cls(**fields)


def head_names(n_heads: int, base: int = 0) -> list[str]:
    """Printed head names, h<base> .. h<base + n_heads - 1> (`steer.head_index_base`)."""
    return [f"h{h + base}" for h in range(n_heads)]


def read_model_config(directory: Path | str) -> ModelConfig:
    """The config of a model written by `finetune`, without loading its weights."""
    path = Path(directory) / CONFIG_FILE
    try:
        return ModelConfig.from_json(read_json(path))
    except (KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: malformed model config ({type(exc).__name__}: {exc}); rerun `finetune`") from None


def preprocess(images: Tensor, img_size: int, mean: list[float], std: list[float]) -> Tensor:
    """uint8 (B, C, H, W) -> normalised float at the model's input size."""
    x = images.float().div_(255)
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > img_size)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype)[None, :, None, None]
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - mean_t) / std_t
