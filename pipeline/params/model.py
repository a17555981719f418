"""`model`: the head-gated ViT's architecture and initialisation (read by `finetune` only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from pipeline.params.base import Section


class ModelParams(Section):
    """The head-gated ViT: any timm ViT plus AdaViT-style per-head gates."""

    name: str = "vit_small_patch16_224"
    """timm model name (a VisionTransformer with a class token), e.g. `vit_small_patch16_224`,
    `deit_small_patch16_224`. The shape fields below override its defaults."""
    pretrained: bool = False
    """Load timm's pretrained weights (a hub download; offline this fails with a clear message)."""
    checkpoint: Path | None = None
    """A local timm state dict (.safetensors, or .pth/.bin loaded with weights_only) to start
    from, for air-gapped machines. Exclusive with `pretrained`."""
    img_size: Annotated[int, Field(ge=8)] | None = None
    """Input side in pixels (images are resized to it); null keeps the timm default."""
    patch_size: Annotated[int, Field(ge=1)] | None = None
    """Patch side in pixels; null keeps the timm default."""
    embed_dim: Annotated[int, Field(ge=8)] | None = None
    """Width of the residual stream; null keeps the timm default."""
    depth: Annotated[int, Field(ge=2)] | None = None
    """Number of blocks; null keeps the timm default."""
    num_heads: Annotated[int, Field(ge=1)] | None = None
    """Attention heads per block; null keeps the timm default."""
    keep_layers: Annotated[int, Field(ge=0)] = 1
    """Blocks before this index are never gated (AdaViT: 1, every block but the first)."""
    gate_bias_init: float = 2.0
    """Initial bias of every decision network (ours: sigmoid(2) = 0.88, so training starts with
    most heads kept and a pretrained model's function is preserved)."""

    @model_validator(mode="after")
    def _consistent(self) -> ModelParams:
        if self.pretrained and self.checkpoint is not None:
            raise ValueError("`pretrained` and `checkpoint` are exclusive: choose one")
        if self.img_size is not None and self.patch_size is not None:
            if self.img_size % self.patch_size:
                raise ValueError(
                    f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}"
                )
        if self.embed_dim is not None and self.num_heads is not None:
            if self.embed_dim % self.num_heads:
                raise ValueError(
                    f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
                )
        if self.depth is not None and self.keep_layers >= self.depth:
            raise ValueError(f"keep_layers {self.keep_layers} must be < depth {self.depth}")
        return self
