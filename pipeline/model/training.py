"""Fine-tuning the head-gated ViT: cross-entropy plus AdaViT's head-usage loss.

The data set lives in memory as one uint8 tensor at its native resolution (CIFAR: 150 MB);
augmentation, resizing and normalisation run batched on the training device, so there is no
per-image Python work in the loop. Under torchrun every process takes an interleaved shard of
one shared permutation and DistributedDataParallel averages the gradients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import GatedViT
from pipeline.params.finetune import AugmentParams, FinetuneParams
from pipeline.progress import progress
from pipeline.runtime import DistInfo
from pipeline.storage import atomic_path, rounded

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- augmentation
def augment(images: Tensor, params: AugmentParams, generator: torch.Generator) -> Tensor:
    """Random crop after zero padding and random horizontal flip, batched. uint8 in, uint8 out."""
    b, _, h, w = images.shape
    if params.crop_padding:
        p = params.crop_padding
        padded = F.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(b, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if params.hflip:
        flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if params.policy != "none":
        images = apply_policy(images, params, generator)
    return images


def apply_policy(images: Tensor, params: AugmentParams, generator: torch.Generator) -> Tensor:
    """TrivialAugment or RandAugment, one independent draw per image (uint8 in, uint8 out).

    torchvision samples its ops from torch's global RNG: it runs inside a forked RNG seeded
    from `generator`, so the run stays deterministic, resumable (the generator is checkpointed)
    and the training gates' Gumbel noise stream is untouched."""
    from torchvision.transforms import v2

    policy = (v2.TrivialAugmentWide() if params.policy == "trivialaugment"
              else v2.RandAugment(num_ops=params.randaugment_ops, magnitude=params.randaugment_magnitude))
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([policy(image) for image in images])


def mix(x: Tensor, labels: Tensor, num_classes: int, params: AugmentParams, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """MixUp or CutMix of a normalised batch with its own reversal: (images, soft targets), or
    (x, None) when both are off. Under torchrun each process mixes its own share of the batch."""
    kinds = [(kind, alpha) for kind, alpha in (("mixup", params.mixup_alpha), ("cutmix", params.cutmix_alpha)) if alpha > 0]
    if not kinds:
        return x, None
    kind, alpha = kinds[int(torch.randint(len(kinds), (1,), generator=generator))]
    lam = float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator))).beta(alpha, alpha))
    partner = x.flip(0)
    if kind == "mixup":
        mixed = lam * x + (1 - lam) * partner
    else:  # a box of area (1 - lam) H W pasted from the partner; lam corrected for clipping
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy = int(torch.randint(0, h, (1,), generator=generator))
        cx = int(torch.randint(0, w, (1,), generator=generator))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)
    targets = F.one_hot(labels, num_classes).to(x.dtype)
    return mixed, lam * targets + (1 - lam) * targets.flip(0)


# ------------------------------------------------------------------------------ schedule
def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress_frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress_frac)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embeddings and tokens (timm's convention)."""
    decay, no_decay = [], []
    skip = {"vit.pos_embed", "vit.cls_token", "vit.reg_token"}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def usage_loss(gates: Tensor, target: float) -> Tensor:
    """AdaViT's head-usage loss: |mean gate - target| over batch, gated blocks and heads."""
    return (gates.mean() - target).abs()


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    accuracy: float
    head_usage: float
    """Mean eval gate of the final block."""
    head_usage_per_block: list[float]
    """Per block (1.0 for ungated blocks)."""
    head_usage_per_head: list[float]
    """Final block, per head."""
    predictions: Tensor

    def summary(self) -> dict[str, Any]:
        return {
            "test_accuracy": self.accuracy,
            "head_usage": self.head_usage,
            "head_usage_per_block": self.head_usage_per_block,
            "head_usage_per_head": self.head_usage_per_head,
        }


@torch.no_grad()
def evaluate(model: GatedViT, images: Tensor, labels: Tensor, config: ModelConfig, device: torch.device, batch_size: int) -> Evaluation:
    """Eval-mode accuracy and head usage (deterministic gates) over a uint8 image tensor."""
    was_training = model.training
    model.eval()
    preds, gate_sums = [], torch.zeros(len(model.gated_blocks), model.num_heads, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        x = config.preprocess(images[start : start + batch_size].to(device))
        out = model(x)
        preds.append(out.logits.argmax(-1).cpu())
        gate_sums += out.gates.sum(0).double().cpu()
    model.train(was_training)
    predictions = torch.cat(preds)
    per_head = gate_sums / len(images)
    per_block = [1.0] * model.keep_layers + per_head.mean(1).tolist()
    return Evaluation(
        accuracy=float((predictions == labels).double().mean()),
        head_usage=per_block[-1],
        head_usage_per_block=per_block,
        head_usage_per_head=per_head[-1].tolist(),
        predictions=predictions,
    )


# ------------------------------------------------------------------------------- training
@dataclass
class TrainState:
    """What an epoch checkpoint holds (plain tensors and numbers: loadable with weights_only)."""

    epoch: int
    history: list[dict[str, float]]


def run_fingerprint(model: nn.Module, images: Tensor, labels: Tensor, config: ModelConfig, params: FinetuneParams) -> str:
    """Hash of everything that determines a training run: initial weights, training data, model
    config and the finetune params that change the arithmetic (not `resume`, `num_workers`,
    `device`). A checkpoint is resumed only by a run with the same fingerprint: models/vit_ckpt
    is a private scratch file that outlives parameter changes (no DVC output, so nothing
    removes it), and resuming another run's checkpoint would silently return that run's weights."""
    h = hashlib.sha256()
    settings = params.model_dump(mode="json", exclude={"resume", "num_workers", "device"})
    h.update(json.dumps({"finetune": settings, "model": config.to_json()}, sort_keys=True).encode())
    tensors = [t for _, t in sorted(model.state_dict().items())] + [images, labels]
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, state: TrainState, fingerprint: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "data_rng": gen.get_state(),
                "epoch": state.epoch,
                "history": state.history,
                "fingerprint": fingerprint,
            },
            tmp,
        )


RESUME_ADVICE = "delete it or set finetune.resume: false"


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """A resume checkpoint's contents, or None when another run wrote it (a warning says so).
    Both training loops read their checkpoints through this; each restores its own state."""
    try:  # weights_only: a crafted pickle is refused instead of run
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or malicious: the same user error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"{path}: rejected as a resume checkpoint (only plain tensors are loaded): {first}; {RESUME_ADVICE}") from None
    if not isinstance(ckpt, dict) or ckpt.get("fingerprint") != fingerprint:
        # the fingerprint covers every finetune param, `loop` included: the other loop's checkpoint lands here
        log.warning("%s was written by a run with other parameters, initial weights, data or loop: training from scratch", path)
        return None
    return ckpt


def malformed_checkpoint(path: Path, exc: Exception) -> PipelineError:
    return PipelineError(f"{path}: malformed resume checkpoint ({type(exc).__name__}: {exc}); {RESUME_ADVICE}")


def check_batch_split(params: FinetuneParams, dist_info: DistInfo) -> None:
    """finetune.nproc is checked against the batch when params load, but only this process sees
    the whole run (nodes x processes per node); a remainder would silently be dropped."""
    if params.batch_size % dist_info.world:
        raise PipelineError(
            f"finetune.batch_size {params.batch_size} is not divisible by the {dist_info.world} processes "
            "of this run (nodes x processes per node): every process takes an equal share of each batch"
        )


def _restore(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, fingerprint: str) -> TrainState | None:
    """The checkpoint's state, or None (nothing changed) when it belongs to another run."""
    ckpt = load_checkpoint(path, fingerprint)
    if ckpt is None:
        return None
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        gen.set_state(ckpt["data_rng"])
        return TrainState(epoch=int(ckpt["epoch"]), history=list(ckpt["history"]))
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise malformed_checkpoint(path, exc) from None


def train(
    model: GatedViT,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    config: ModelConfig,
    params: FinetuneParams,
    device: torch.device,
    dist_info: DistInfo | None = None,
    checkpoint: Path | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, float]]:
    """Train in place; return per-epoch history (train loss/accuracy; on the main process also
    test accuracy, final-block head usage and the usage of every block).

    With `checkpoint`, the state after every epoch is saved there, and training continues from
    it when it exists and `params.resume` is set (the resumed run equals an uninterrupted one).
    `on_epoch(row)` sees every history row on the main process as soon as it exists (the rows a
    resumed run restored first), so a logger can publish the run while it trains.
    """
    dist_info = dist_info or DistInfo()
    check_batch_split(params, dist_info)
    model.to(device).train()
    ddp_model: nn.Module = model
    if dist_info.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(param_groups(model, params.weight_decay), lr=params.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(params.seed)  # shuffling + augmentation, same on all ranks
    n = len(train_images)
    per_rank = params.batch_size // dist_info.world
    steps_per_epoch = n // params.batch_size if n >= params.batch_size else 1
    total_steps = steps_per_epoch * params.epochs
    warmup = round(params.warmup_epochs * steps_per_epoch)
    autocast = device.type == "cuda" and params.precision == "bf16"

    state = TrainState(epoch=0, history=[])
    fingerprint = run_fingerprint(model, train_images, train_labels, config, params) if checkpoint is not None else ""
    if checkpoint is not None and params.resume and checkpoint.exists():
        restored = _restore(checkpoint, model, opt, gen, fingerprint)
        if restored is not None:
            state = restored
            log.info("resumed from %s after epoch %d", checkpoint, state.epoch)
    if on_epoch is not None and dist_info.is_main:
        for row in state.history:
            on_epoch(row)

    for epoch in range(state.epoch, params.epochs):
        perm = torch.randperm(n, generator=gen)
        loss_sum = correct = seen = 0.0
        batches = progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{params.epochs}", unit="batch")
        for step_in_epoch in batches:
            step = epoch * steps_per_epoch + step_in_epoch
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, params.lr, params.min_lr)
            idx = perm[step_in_epoch * params.batch_size : (step_in_epoch + 1) * params.batch_size]
            aug = augment(train_images[idx], params.augment, gen)  # same draws on every rank
            idx_rank = slice(dist_info.rank * per_rank, (dist_info.rank + 1) * per_rank)
            x = config.preprocess(aug[idx_rank].to(device, non_blocking=True))
            y = train_labels[idx][idx_rank].to(device, non_blocking=True)
            x, soft_targets = mix(x, y, config.num_classes, params.augment, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = ddp_model(x)
                target = y if soft_targets is None else soft_targets
                ce = F.cross_entropy(out.logits.float(), target, label_smoothing=params.label_smoothing)
                loss = ce + params.head_weight * usage_loss(out.gates.float(), params.head_target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += float((out.logits.argmax(-1) == y).sum())
            seen += len(y)
        if dist_info.world > 1:  # each rank saw its own share of every batch: report the whole epoch
            totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            loss_sum, correct, seen = totals.tolist()
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
        if dist_info.is_main:
            ev = evaluate(model, test_images, test_labels, config, device, batch_size=max(per_rank, 256))
            row.update(test_accuracy=ev.accuracy, head_usage=ev.head_usage, head_usage_per_block=ev.head_usage_per_block)
            log.info("epoch %d/%d: %s", epoch + 1, params.epochs, {k: v for k, v in rounded(row, 4).items() if k != "head_usage_per_block"})
        state = TrainState(epoch=epoch + 1, history=[*state.history, row])
        if on_epoch is not None and dist_info.is_main:
            on_epoch(row)
        if checkpoint is not None and dist_info.is_main:
            _checkpoint(checkpoint, model, opt, gen, state, fingerprint)
        if dist_info.world > 1:
            dist.barrier()
    model.eval()
    return state.history
