"""AdaViT-style dynamic head pruning on any timm VisionTransformer.

Every block from `keep_layers` on owns a decision network: a linear map from the CLS token of
the block's *input* residual stream to one logit per head. A forward pre-hook on the block's
`attn.proj` multiplies each head's slice of the projection input (the concatenated per-head
attention outputs) by its gate, so a dropped head contributes exactly nothing while timm's own
Block/Attention code, its fused `scaled_dot_product_attention` and its state-dict keys stay
untouched (a timm checkpoint loads into `GatedViT.vit` unchanged).

Gates: training uses a Gumbel-sigmoid with hard straight-through decisions; eval keeps a head
iff its logit is > 0.

Eval forwards can instead skip the dropped heads (`head_path = "skipping"`, `pipeline.model.heads`):
every gated block groups the batch by gate pattern and runs each group through an attention
that holds only its kept heads. Same gates, outputs equal to the masked path up to float
rounding; faster on a CPU when heads are dropped, slower on a GPU (BENCHMARKS.md), hence
`resolve_head_path`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from pipeline.errors import ParamsError, PipelineError
from pipeline.model.config import ModelConfig, ModelShape
from pipeline.model.heads import HeadSliceCache, run_block_with
from pipeline.params.model import ModelParams
from pipeline.storage import load_state_dict_file, load_weights, save_weights

log = logging.getLogger(__name__)

SHAPE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
HEAD_PATHS = ("masked", "skipping")


def resolve_head_path(choice: str, device: torch.device) -> str:
    """`auto` -> `skipping` on a CPU, `masked` elsewhere: decided by device type, not timed at run
    time, so the stored bytes do not depend on the machine's load. BENCHMARKS.md ("Inference
    with pruned heads") has the measurements behind the choice on both device types."""
    if choice == "auto":
        return "skipping" if device.type == "cpu" else "masked"
    if choice not in HEAD_PATHS:
        raise PipelineError(f"unknown head path {choice!r}: choose auto, {' or '.join(HEAD_PATHS)}")
    return choice


@dataclass
class GatedOutput:
    logits: Tensor
    """(B, num_classes) classifier logits."""
    gates: Tensor
    """(B, G, H) gate values of the G gated blocks (0/1; straight-through in training)."""
    gate_logits: Tensor
    """(B, G, H) decision-network logits."""
    cls_inputs: dict[int, Tensor]
    """CLS token of the stream entering each block asked for in `record`: block -> (B, D)."""


def gumbel_sigmoid_st(logits: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """Hard 0/1 gates whose gradient is that of sigmoid((logit + g1 - g2) / tau)."""
    u = torch.rand((2, *logits.shape), device=logits.device, dtype=logits.dtype, generator=generator)
    eps = torch.finfo(u.dtype).tiny
    gumbel = -torch.log((-torch.log(u.clamp_min(eps))).clamp_min(eps))
    soft = torch.sigmoid((logits + gumbel[0] - gumbel[1]) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


class GatedViT(nn.Module):
    """A timm VisionTransformer (`self.vit`) plus one decision network per gated block."""

    def __init__(self, vit: VisionTransformer, keep_layers: int = 1, gate_bias_init: float = 2.0, tau: float = 5.0):
        super().__init__()
        if vit.cls_token is None or vit.global_pool != "token":
            raise PipelineError("the gated ViT needs a class token and `global_pool='token'` (decisions read the CLS token)")
        depth = len(vit.blocks)
        if not 0 <= keep_layers < depth:
            raise PipelineError(f"model.keep_layers={keep_layers} must be < the model's depth {depth}")
        self.vit = vit
        self.tau = tau
        self.keep_layers = keep_layers
        self.num_heads = vit.blocks[0].attn.num_heads
        self.depth = depth
        self.gated_blocks = list(range(keep_layers, depth))
        self.decision = nn.ModuleList(nn.Linear(vit.embed_dim, self.num_heads) for _ in self.gated_blocks)
        for net in self.decision:
            nn.init.normal_(net.weight, std=0.02)
            nn.init.constant_(net.bias, gate_bias_init)
        self.head_path = "masked"
        """How eval forwards run gated blocks: `masked` (every head computed, dropped ones zeroed)
        or `skipping` (only kept heads computed). Training always masks."""
        self._slices = HeadSliceCache()
        # Gates of the block being run, read by the pre-hook of its attn.proj (None: all kept).
        self._head_mask: dict[int, Tensor | None] = {}
        for i in self.gated_blocks:
            self._head_mask[i] = None
            vit.blocks[i].attn.proj.register_forward_pre_hook(self._make_mask_hook(i))

    # ---------------------------------------------------------------------------------- gates
    def _make_mask_hook(self, block: int):
        def mask_heads(module: nn.Module, args: tuple[Tensor, ...]):
            gates = self._head_mask[block]
            if gates is None:
                return None
            (x,) = args
            b, n, c = x.shape
            masked = x.view(b, n, self.num_heads, c // self.num_heads) * gates.to(x.dtype)[:, None, :, None]
            return (masked.view(b, n, c),)

        return mask_heads

    def decision_net(self, block: int) -> nn.Linear:
        return self.decision[block - self.keep_layers]

    def gate(self, logits: Tensor) -> Tensor:
        """Training: Gumbel-sigmoid straight-through; eval: logit > 0."""
        if self.training:
            return gumbel_sigmoid_st(logits, self.tau)
        return (logits > 0).to(logits.dtype)

    # ------------------------------------------------------------------------------- pieces
    def embed(self, images: Tensor) -> Tensor:
        """Patch embedding, class token and position embedding: the stream entering block 0."""
        vit = self.vit
        x = vit.patch_embed(images)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def run_block(self, block: int, x: Tensor, gates: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Run block `block` on stream `x`; gated blocks decide their own gates unless given.

        Returns (output stream, gate logits or None, gates or None).
        """
        if block < self.keep_layers:
            return self.vit.blocks[block](x), None, None
        logits = self.decision_net(block)(x[:, 0])
        if gates is None:
            gates = self.gate(logits)
        if self.head_path == "skipping" and not self.training:
            return self._run_block_skipping(block, x, gates), logits, gates
        self._head_mask[block] = gates
        try:
            out = self.vit.blocks[block](x)
        finally:
            self._head_mask[block] = None
        return out, logits, gates

    @torch.no_grad()
    def _run_block_skipping(self, block: int, x: Tensor, gates: Tensor) -> Tensor:
        """Block `block` computing only kept heads: one run per gate pattern in the batch."""
        timm_block = self.vit.blocks[block]
        patterns, group = torch.unique(gates > 0, dim=0, return_inverse=True)

        def run(rows: Tensor, pattern: Tensor) -> Tensor:
            if bool(pattern.all()):  # nothing to skip: timm's own block (no gates set, no mask)
                return timm_block(rows)
            return run_block_with(timm_block, self._slices.attention(block, timm_block.attn, pattern), rows)

        if len(patterns) == 1:
            return run(x, patterns[0])
        out = torch.empty_like(x)
        for p, pattern in enumerate(patterns):
            members = (group == p).nonzero().squeeze(1)
            out[members] = run(x[members], pattern)
        return out

    def _apply(self, fn, *args, **kwargs):
        self._slices.clear()  # moved or cast: cached slices hold the old tensors
        return super()._apply(fn, *args, **kwargs)

    def head(self, x: Tensor) -> Tensor:
        """Final norm, CLS pooling and classifier."""
        return self.vit.forward_head(self.vit.norm(x))

    # ------------------------------------------------------------------------------ forward
    def forward(self, images: Tensor, record: tuple[int, ...] = ()) -> GatedOutput:
        x = self.embed(images)
        all_gates, all_logits, cls_inputs = [], [], {}
        for i in range(self.depth):
            if i in record:
                cls_inputs[i] = x[:, 0]
            x, logits, gates = self.run_block(i, x)
            if gates is not None:
                all_gates.append(gates)
                all_logits.append(logits)
        return GatedOutput(self.head(x), torch.stack(all_gates, 1), torch.stack(all_logits, 1), cls_inputs)

    # What steering needs: everything before the final block once, then the final block with
    # gates of our choosing.
    def forward_to_final(self, images: Tensor) -> Tensor:
        """(B, N, D) residual stream entering the final block (earlier blocks with own gates)."""
        x = self.embed(images)
        for i in range(self.depth - 1):
            x, _, _ = self.run_block(i, x)
        return x

    def final_gate_logits(self, cls: Tensor) -> Tensor:
        """The final block's decision network applied to a (B, D) CLS input."""
        return self.decision_net(self.depth - 1)(cls)

    def forward_final(self, tokens: Tensor, gates: Tensor) -> Tensor:
        """Final block on `tokens` with the given (B, H) gates, then the classifier: (B, C) logits."""
        x, _, _ = self.run_block(self.depth - 1, tokens, gates=gates)
        return self.head(x)


# ---------------------------------------------------------------------------------- building
def model_config(params: ModelParams, vit: VisionTransformer, num_classes: int, class_names: list[str], tau: float) -> ModelConfig:
    """The config of a freshly built model (the shape as timm resolved it)."""
    shape = ModelShape(
        img_size=int(vit.patch_embed.img_size[0]),
        patch_size=int(vit.patch_embed.patch_size[0]),
        embed_dim=int(vit.embed_dim),
        depth=len(vit.blocks),
        num_heads=int(vit.blocks[0].attn.num_heads),
    )
    cfg = vit.pretrained_cfg or {}
    return ModelConfig(
        timm_name=params.name,
        shape=shape,
        num_classes=num_classes,
        class_names=list(class_names),
        keep_layers=params.keep_layers,
        gate_bias_init=params.gate_bias_init,
        tau=tau,
        mean=list(cfg.get("mean", (0.5, 0.5, 0.5))),
        std=list(cfg.get("std", (0.5, 0.5, 0.5))),
    )


def create_vit(name: str, num_classes: int, pretrained: bool = False, **shape: int) -> VisionTransformer:
    # A name that is not a timm ViT is a bad parameter (ParamsError, exit 2), not a crash.
    try:
        vit = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **shape)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ParamsError(f"model.name = {name!r}: not a timm model ({exc})") from None
        raise
    except TypeError as exc:  # e.g. a ResNet does not take img_size/patch_size
        raise ParamsError(f"model.name = {name!r}: not a timm VisionTransformer ({exc})") from None
    except (OSError, ConnectionError) as exc:
        if pretrained:
            raise PipelineError(
                f"could not download timm's pretrained weights for {name!r} ({type(exc).__name__}); "
                "offline, download them elsewhere and set model.pretrained: false with "
                "model.checkpoint: <path to the .safetensors/.pth state dict>"
            ) from None
        raise
    if not isinstance(vit, VisionTransformer):
        raise ParamsError(f"model.name = {name!r}: a {type(vit).__name__}, not a timm VisionTransformer")
    return vit


def load_timm_checkpoint(vit: VisionTransformer, path) -> None:
    """Load a timm-format state dict (e.g. ImageNet weights) into `vit`.

    timm's own filter resamples position embeddings to the model's grid; a classifier head of a
    different size is dropped (the new head keeps its fresh initialisation).
    """
    state = load_state_dict_file(path)
    own = vit.state_dict()
    try:  # tensors of the wrong shape (another architecture) are a user error, not a crash
        state = checkpoint_filter_fn(state, vit)
        for key in ("head.weight", "head.bias"):
            if key in state and state[key].shape != own[key].shape:
                log.info("checkpoint %s has shape %s, model %s: keeping the new head", key, tuple(state[key].shape), tuple(own[key].shape))
                del state[key]
        missing, unexpected = vit.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[:2] if line.strip())
        raise PipelineError(f"{path}: does not fit model ({detail})") from None
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise PipelineError(f"{path}: does not fit model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def build_gated_vit(params: ModelParams, num_classes: int, tau: float = 5.0) -> GatedViT:
    """A fresh gated model from the `model` params (timm weights or a local checkpoint)."""
    shape = {k: getattr(params, k) for k in SHAPE_KEYS if getattr(params, k) is not None}
    vit = create_vit(params.name, num_classes, pretrained=params.pretrained, **shape)
    if params.keep_layers >= len(vit.blocks):  # depth may come from timm's default: known only now
        raise ParamsError(f"model.keep_layers = {params.keep_layers}: must be < the model's depth {len(vit.blocks)}")
    if params.checkpoint is not None:
        load_timm_checkpoint(vit, params.checkpoint)
    return GatedViT(vit, keep_layers=params.keep_layers, gate_bias_init=params.gate_bias_init, tau=tau)


def gated_vit_from_config(config: ModelConfig) -> GatedViT:
    """Rebuild the architecture from a saved config (no download; weights loaded separately)."""
    vit = create_vit(config.timm_name, config.num_classes, pretrained=False, **asdict(config.shape))
    return GatedViT(vit, keep_layers=config.keep_layers, gate_bias_init=config.gate_bias_init, tau=config.tau)


def save_gated_vit(directory, model: GatedViT, config: ModelConfig) -> None:
    save_weights(directory, model.state_dict(), config.to_json())


def load_gated_vit(directory) -> tuple[GatedViT, ModelConfig]:
    """Load a model written by the `finetune` stage (safetensors + config.json; no pickle)."""
    state, raw = load_weights(directory)
    try:
        config = ModelConfig.from_json(raw)
        model = gated_vit_from_config(config)
    except (KeyError, TypeError, ValueError, PipelineError) as exc:  # ParamsError is a ValueError
        raise PipelineError(f"{directory}/config.json: cannot rebuild the model ({type(exc).__name__}: {exc}); rerun `finetune`") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        # torch's first line is a header; the first detail line says which tensor and why
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise PipelineError(f"{directory}: model.safetensors does not fit config.json ({'; '.join(lines[:2])})") from None
    return model.eval(), config
