"""Computing only the kept heads of a timm attention block.

A gated block keeps some of its heads; the masked path (`GatedViT`'s default) computes every
head and zeroes the dropped ones. Here the dropped heads are never computed: `KeptHeadsAttention`
holds only the kept heads' rows of the fused qkv weight and columns of the output projection,
so a block with h of H heads kept costs h/H of the attention's FLOPs (`pipeline.model.flops`).

Two users: the head-skipping eval path of `GatedViT` (`head_path = "skipping"`: the batch is
grouped by gate pattern, and each pattern's sliced attention is built once and kept in a
`HeadSliceCache`), and the class-specific compact models of `pipeline.model.pruned`, whose gated
blocks *are* such an attention.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import PipelineError


def kept_head_rows(heads: Tensor, head_dim: int, num_heads: int) -> tuple[Tensor, Tensor]:
    """For kept `heads` (1-D indices): their columns of the projection (= rows of q, k or v),
    and their rows of the fused qkv weight (q, then k, then v)."""
    rows = (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).flatten()
    width = num_heads * head_dim
    return rows, torch.cat([rows, rows + width, rows + 2 * width])


class KeptHeadsAttention(nn.Module):
    """A timm `Attention` reduced to some of its heads (eval semantics: no dropout). Equal to the
    full attention with the other heads' outputs zeroed before the projection, up to float
    rounding; with no head kept only the projection's bias reaches the stream."""

    def __init__(self, dim: int, kept: int, head_dim: int, qkv_bias: bool, proj_bias: bool,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None):
        super().__init__()
        self.kept, self.head_dim, self.dim = kept, head_dim, dim
        self.qkv = nn.Linear(dim, 3 * kept * head_dim, bias=qkv_bias) if kept else None
        self.proj = nn.Linear(kept * head_dim, dim, bias=proj_bias) if kept else None
        # q/k norms act on one head at a time (LayerNorm over head_dim), so they carry over as they are
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.proj_bias_only = nn.Parameter(torch.zeros(dim)) if (not kept and proj_bias) else None

    @classmethod
    @torch.no_grad()
    def from_timm(cls, attn: nn.Module, heads: list[int] | Tensor) -> KeptHeadsAttention:
        """The kept `heads` of timm attention `attn` (same device and dtype; weights copied)."""
        if getattr(attn, "gate", None) is not None or not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise PipelineError("computing kept heads only needs timm attention without a gate or a norm over all heads")
        weight = attn.qkv.weight
        heads = torch.as_tensor(heads, dtype=torch.long, device=weight.device).flatten()
        d, dim = attn.head_dim, attn.proj.out_features
        out = cls(dim, len(heads), d, attn.qkv.bias is not None, attn.proj.bias is not None,
                  copy.deepcopy(attn.q_norm), copy.deepcopy(attn.k_norm)).to(weight.device, weight.dtype)
        if len(heads):
            rows, qkv_rows = kept_head_rows(heads, d, attn.num_heads)
            out.qkv.weight.copy_(weight[qkv_rows])
            if attn.qkv.bias is not None:
                out.qkv.bias.copy_(attn.qkv.bias[qkv_rows])
            out.proj.weight.copy_(attn.proj.weight[:, rows])
            if attn.proj.bias is not None:
                out.proj.bias.copy_(attn.proj.bias)
        elif attn.proj.bias is not None:
            out.proj_bias_only.copy_(attn.proj.bias)
        return out.eval()

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, n, _ = x.shape
        if not self.kept:
            out = x.new_zeros(b, n, self.dim)
            return out if self.proj_bias_only is None else out + self.proj_bias_only
        q, k, v = self.qkv(x).reshape(b, n, 3, self.kept, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.kept * self.head_dim))


def run_block_with(block: nn.Module, attention: nn.Module, x: Tensor) -> Tensor:
    """A timm `Block` (eval) with `attention` in place of its own."""
    x = x + block.drop_path1(block.ls1(attention(block.norm1(x))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def run_block_with_heads(block: nn.Module, x: Tensor, heads: Tensor) -> Tensor:
    """A timm `Block` (eval) whose attention computes only `heads` (1-D indices; sliced anew)."""
    return run_block_with(block, KeptHeadsAttention.from_timm(block.attn, heads), x)


class HeadSliceCache:
    """Sliced attentions by (block, gate pattern), least recently used evicted past `max_entries`.

    An entry is rebuilt when the block's weights changed in place (their version counters moved:
    an optimizer step, `load_state_dict`) or were replaced by other tensors (an assignment of a
    new `nn.Parameter`, whose counter may well read the same); `GatedViT` clears the cache when
    it is moved or cast.
    Bounded because a block of H heads has 2^H patterns (ViT-S: at most ~2.4 MB per entry)."""

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, bytes], tuple[list[tuple[Tensor, int]], KeptHeadsAttention]] = OrderedDict()

    def attention(self, block: int, attn: nn.Module, pattern: Tensor) -> KeptHeadsAttention:
        """The sliced attention of `attn` keeping the heads where the bool `pattern` is set."""
        key = (block, bytes(pattern.cpu().to(torch.uint8).tolist()))
        stamp = [(p, p._version) for p in attn.parameters()]
        hit = self._entries.get(key)
        if hit is not None and len(hit[0]) == len(stamp) and all(
                old is new and seen == now for (old, seen), (new, now) in zip(hit[0], stamp)):
            self._entries.move_to_end(key)
            return hit[1]
        sliced = KeptHeadsAttention.from_timm(attn, pattern.nonzero().flatten())
        self._entries[key] = (stamp, sliced)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return sliced

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
