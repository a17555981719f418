"""The final block's output for any gate pattern, from the CLS row alone (docs/METHOD.md, section 6).

With `global_pool='token'` the classifier reads only row 0 of the final block's output, and row
0 after attention is

    x_0 + b_proj + sum_h g_h P_h o_h        (o_h: head h's attention output for the CLS query,
                                              P_h: its slice of the output projection)

so per image the H terms `P_h o_h` are computed once (`head_terms`: one attention pass with a
single query), and every gate pattern then costs one small product plus LayerScale, the MLP, the
final norm and the classifier on a single row (`pattern_logits`). This equals the masked final
block (a dropped head's output is zero before the projection, whose bias stays) up to float
rounding. Blocks whose attention does more than that (a norm over the concatenated heads, a
learned output gate, separate q/k/v projections) are refused by `unsupported`; the caller then
runs the full block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.gated_vit import GatedViT


def unsupported(model: GatedViT) -> str | None:
    """Why the CLS-row identity does not hold for this model's final block (None: it holds)."""
    vit, attn = model.vit, model.vit.blocks[-1].attn
    if vit.global_pool != "token" or getattr(vit, "attn_pool", None) is not None:
        return f"the classifier pools with {vit.global_pool!r}, not the CLS token alone"
    if getattr(attn, "qkv", None) is None:
        return "the final block's attention has no fused qkv projection"
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        return "the final block's attention normalises the concatenated heads (scale_norm)"
    if getattr(attn, "gate", None) is not None:
        return "the final block's attention has a learned output gate"
    return None


@dataclass(frozen=True)
class HeadTerms:
    """What the final block's CLS row is made of, per image."""

    x0: Tensor
    """(B, D) CLS row of the stream entering the final block."""
    terms: Tensor
    """(B, H, D) each head's projected attention output for the CLS query, `P_h o_h`."""
    bias: Tensor
    """(D,) the output projection's bias (zeros without one)."""


@torch.no_grad()
def head_terms(model: GatedViT, tokens: Tensor) -> HeadTerms:
    """The per-head CLS terms of the final block for a (B, N, D) stream entering it."""
    block = model.vit.blocks[-1]
    attn = block.attn
    h = block.norm1(tokens)
    b, n, d = h.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(h).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q[:, :, :1], k, v)[:, :, 0]  # (B, H, hd): the CLS query only
    weight = attn.proj.weight.view(d, heads, head_dim)  # (D_out, H, hd)
    terms = torch.einsum("bhe,dhe->bhd", o, weight)
    bias = attn.proj.bias if attn.proj.bias is not None else torch.zeros(d, dtype=tokens.dtype, device=tokens.device)
    return HeadTerms(tokens[:, 0], terms, bias)


@torch.no_grad()
def pattern_logits(model: GatedViT, terms: HeadTerms, patterns: Tensor) -> Tensor:
    """Classifier logits (B, P, C) of every image under each of the 0/1 gate patterns: (P, H)
    shared by all images, or (B, P, H) per image."""
    block, vit = model.vit.blocks[-1], model.vit
    equation = "ph,bhd->bpd" if patterns.dim() == 2 else "bph,bhd->bpd"
    attended = terms.bias + torch.einsum(equation, patterns.to(terms.terms.dtype), terms.terms)  # (B, P, D)
    x = terms.x0[:, None] + block.ls1(attended)
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return vit.head(vit.head_drop(vit.fc_norm(vit.norm(x))))


def all_patterns(n_heads: int, device: torch.device | str = "cpu") -> Tensor:
    """(2^H, H) every 0/1 pattern; row c is the pattern whose bit h is head h (code c)."""
    codes = torch.arange(1 << n_heads, device=device)
    return ((codes[:, None] >> torch.arange(n_heads, device=device)) & 1).float()


def pattern_codes(patterns: Tensor) -> Tensor:
    """The integer code of each (..., H) 0/1 pattern (bit h = head h)."""
    h = patterns.shape[-1]
    return ((patterns > 0).long() * (1 << torch.arange(h, device=patterns.device))).sum(-1)
