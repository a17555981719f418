"""What head usage saves: the matmul FLOPs of one image through the gated ViT, from its gates.

Counted the way `torch.utils.flop_counter.FlopCounterMode` counts (2 FLOPs per multiply-add in
linear layers, the patch-embedding convolution and attention; elementwise work such as norms,
softmax and GELU is not counted; on the CPU its count includes attention only when SDPA runs
on the math backend, the fused CPU kernel having no FLOP formula). Per block the cost is affine in the number of kept heads:

    block = MLP + decision network + kept heads x (qkv rows + attention + projection columns)

so the mean FLOPs over images follow from the mean number of kept heads per block, i.e. from
head usage. Dense = every head kept (what the masked path always computes); the head-computing
path (`heads.run_block_with_heads`) costs exactly `FlopModel.image(kept)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.model.gated_vit import GatedViT


@dataclass(frozen=True)
class FlopModel:
    fixed: float
    """FLOPs that do not depend on the gates: patch embedding, every block's MLP, the decision
    networks, the classifier."""
    per_head: list[float]
    """Per block: FLOPs one kept head costs (its qkv rows, attention, projection columns)."""
    num_heads: int

    def image(self, kept: Sequence[float]) -> float:
        """FLOPs of one image keeping `kept[b]` heads in block b (a mean may be fractional)."""
        return self.fixed + sum(c * k for c, k in zip(self.per_head, kept))

    @property
    def dense(self) -> float:
        return self.image([self.num_heads] * len(self.per_head))

    def from_usage(self, usage_per_block: Sequence[float]) -> float:
        """Mean FLOPs per image from each block's head usage (fraction of heads kept)."""
        return self.image([u * self.num_heads for u in usage_per_block])


def flop_model(model: GatedViT) -> FlopModel:
    """The FLOP model of a gated timm ViT, from its modules' shapes."""
    vit = model.vit
    patch = vit.patch_embed
    n_patches = patch.num_patches
    tokens = n_patches + vit.num_prefix_tokens
    dim = vit.embed_dim
    conv = patch.proj
    fixed = 2.0 * n_patches * dim * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    per_head = []
    for i, block in enumerate(vit.blocks):
        hidden = block.mlp.fc1.out_features
        fixed += 2.0 * tokens * dim * hidden * 2  # fc1 and fc2
        if i >= model.keep_layers:
            fixed += 2.0 * dim * model.num_heads  # the decision network reads the CLS token
        d = block.attn.head_dim
        qkv_and_proj = 2.0 * tokens * dim * d * 4  # 3 x d rows of qkv, d columns of proj
        attention = 2.0 * tokens * tokens * d * 2  # q k^T and attn v
        per_head.append(qkv_and_proj + attention)
    if hasattr(vit.head, "in_features"):
        fixed += 2.0 * vit.head.in_features * vit.head.out_features
    return FlopModel(fixed=fixed, per_head=per_head, num_heads=model.num_heads)
