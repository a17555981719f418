"""The resident training loop (`finetune.loop: resident`): `finetune` at the pace of a GPU.

Same contract, schedule, loss, evaluation and history rows as `pipeline.model.training.train`;
what differs is where the work happens:

- the data set lives on the training device as uint8 (CIFAR-100's 45,000 training images: 138 MB),
  shuffled there by a generator on that device, which also draws every per-image augmentation:
  crop, flip and the TrivialAugment / RandAugment policy, batched (`pipeline.model.batched_augment`);
- MixUp / CutMix are `training.mix`: one kind, lambda and box per batch, drawn from a CPU
  generator of their own (host scalars only), the mixing itself on the device;
- AdamW is fused (one kernel over all parameters) where torch has it, else `foreach`;
- bf16 autocast on CUDA with `precision: bf16`, as in `train`, and here also for the per-epoch
  test evaluation (the stage's final evaluation stays fp32);
- `finetune.compile`: `torch.compile` of the forward and loss (`compiled_loss`);
- nothing inside an epoch reads a device value back: the loss sum and the correct count
  accumulate on the device and are read once per epoch, so the host runs ahead of the GPU.

A resumed run (`finetune.resume` with a checkpoint) equals an uninterrupted one, as with `train`:
the checkpoint also holds both generators and, on CUDA, the device's global generator (the
Gumbel noise). Other random streams than `train`'s, so its models differ from the standard
loop's; with the per-image policy off, on a CPU, and the same seed, its shuffling, crops and
flips are `train`'s draw for draw (tests/test_fast_training.py compares the losses).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.batched_augment import augment_batch
from pipeline.model.config import ModelConfig
from pipeline.model.gated_vit import GatedViT
from pipeline.model.training import (
    TrainState,
    check_batch_split,
    evaluate,
    load_checkpoint,
    lr_at,
    malformed_checkpoint,
    mix,
    param_groups,
    run_fingerprint,
    usage_loss,
)
from pipeline.params.finetune import FinetuneParams
from pipeline.progress import progress
from pipeline.runtime import DistInfo
from pipeline.storage import atomic_path, rounded

log = logging.getLogger(__name__)

MIX_SEED_OFFSET = 104_729
"""The MixUp / CutMix generator is seeded `finetune.seed + MIX_SEED_OFFSET`, apart from the data
generator's `finetune.seed` (on a CPU both are CPU generators: the same seed would give both the
same stream)."""

LossFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


# ------------------------------------------------------------------------------ the step
def make_optimizer(model: nn.Module, params: FinetuneParams) -> tuple[torch.optim.Optimizer, str]:
    """AdamW over `training.param_groups`, fused where this torch supports it on the model's
    device, else foreach; returns the optimiser and which implementation it is."""
    groups = param_groups(model, params.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=params.lr, betas=(0.9, 0.999), fused=True), "fused"
    except (RuntimeError, TypeError, ValueError) as exc:  # a device or dtype without the fused kernel
        log.info("fused AdamW unavailable (%s): using foreach", exc)
        return torch.optim.AdamW(param_groups(model, params.weight_decay), lr=params.lr, betas=(0.9, 0.999), foreach=True), "foreach"


def loss_fn(model: nn.Module, params: FinetuneParams, autocast: bool) -> LossFn:
    """`(x, target, y) -> (loss, correct)`: the forward under autocast, cross-entropy against
    `target` (labels or MixUp's soft targets) plus the usage loss, and how many argmax
    predictions equal the labels `y`: `train`'s arithmetic, as device tensors."""

    def step(x: Tensor, target: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            ce = F.cross_entropy(out.logits.float(), target, label_smoothing=params.label_smoothing)
            loss = ce + params.head_weight * usage_loss(out.gates.float(), params.head_target)
        return loss, (out.logits.argmax(-1) == y).sum()

    return step


def compiled_loss(model: nn.Module, params: FinetuneParams, autocast: bool) -> LossFn:
    """`loss_fn`, compiled by `torch.compile` when `params.compile` is set. The whole gated
    forward is one graph (the head-mask hooks trace through); its backward is compiled with it."""
    fn = loss_fn(model, params, autocast)
    return torch.compile(fn) if params.compile else fn


def normalise(images: Tensor, config: ModelConfig, mean: Tensor, std: Tensor) -> Tensor:
    """`config.preprocess` with the mean and std already on the device (no per-step copy)."""
    x = images.float().div_(255)
    size = config.shape.img_size
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    return (x - mean) / std


class ResidentStep:
    """One training step of the resident loop on batch `idx` (indices into the resident data
    set): augment the whole batch on the device, take this process's share, normalise, mix,
    forward, backward, AdamW. Returns the loss and the correct count as device tensors and the
    number of images; reads nothing back (`bench/bench_gpu_train.py` checks that on CUDA)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, images: Tensor, labels: Tensor, config: ModelConfig,
                 params: FinetuneParams, data_gen: torch.Generator, mix_gen: torch.Generator, autocast: bool,
                 share: slice = slice(None)):
        self.opt, self.images, self.labels, self.config, self.params = opt, images, labels, config, params
        self.data_gen, self.mix_gen, self.share = data_gen, mix_gen, share
        device = images.device
        self.mean = torch.tensor(config.mean, dtype=torch.float32, device=device)[None, :, None, None]
        self.std = torch.tensor(config.std, dtype=torch.float32, device=device)[None, :, None, None]
        self.loss = compiled_loss(model, params, autocast)

    def __call__(self, idx: Tensor, lr: float) -> tuple[Tensor, Tensor, int]:
        for group in self.opt.param_groups:
            group["lr"] = lr
        aug = augment_batch(self.images[idx], self.params.augment, self.data_gen)  # the whole batch: same draws on every rank
        x = normalise(aug[self.share], self.config, self.mean, self.std)
        y = self.labels[idx][self.share]
        x, soft_targets = mix(x, y, self.config.num_classes, self.params.augment, self.mix_gen)
        loss, correct = self.loss(x, y if soft_targets is None else soft_targets, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach(), correct, len(y)


# --------------------------------------------------------------------------- checkpoints
def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gens: dict[str, torch.Generator], device: torch.device,
          state: TrainState, fingerprint: str) -> None:
    payload: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in gens.items()},
        "epoch": state.epoch,
        "history": state.history,
        "fingerprint": fingerprint,
    }
    if device.type == "cuda":
        payload["cuda_rng"] = torch.cuda.get_rng_state(device)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _restore(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gens: dict[str, torch.Generator], device: torch.device,
             fingerprint: str) -> TrainState | None:
    """The checkpoint's state, or None (nothing changed) when another run wrote it."""
    ckpt = load_checkpoint(path, fingerprint)
    if ckpt is None:
        return None
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        for name, g in gens.items():
            g.set_state(ckpt["generators"][name])
        return TrainState(epoch=int(ckpt["epoch"]), history=list(ckpt["history"]))
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise malformed_checkpoint(path, exc) from None


# ------------------------------------------------------------------------------ the loop
def train_resident(
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
    """Train in place with the data set resident on `device`; return the per-epoch history, as
    `training.train` does (train loss/accuracy; on the main process also test accuracy,
    final-block head usage and the usage of every block).

    With `checkpoint`, the state after every epoch is saved there, and training continues from it
    when it exists and `params.resume` is set. `on_epoch(row)` sees every history row on the main
    process as soon as it exists (a resumed run's restored rows first). Under torchrun every
    process holds the whole data set, draws the same permutation and augmentation (one generator
    seed on every rank) and trains on its share of each batch.
    """
    dist_info = dist_info or DistInfo()
    check_batch_split(params, dist_info)
    fingerprint = run_fingerprint(model, train_images, train_labels, config, params) if checkpoint is not None else ""
    model.to(device).train()
    ddp_model: nn.Module = model
    if dist_info.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt, kind = make_optimizer(model, params)
    data_gen = torch.Generator(device=device).manual_seed(params.seed)  # shuffling + per-image augmentation
    mix_gen = torch.Generator().manual_seed(params.seed + MIX_SEED_OFFSET)  # MixUp / CutMix: per-batch host scalars
    gens = {"data": data_gen, "mix": mix_gen}
    images = train_images.to(device)
    test_on_device = test_images.to(device)
    n = len(images)
    per_rank = params.batch_size // dist_info.world
    steps_per_epoch = n // params.batch_size if n >= params.batch_size else 1
    total_steps = steps_per_epoch * params.epochs
    warmup = round(params.warmup_epochs * steps_per_epoch)
    autocast = device.type == "cuda" and params.precision == "bf16"
    share = slice(dist_info.rank * per_rank, (dist_info.rank + 1) * per_rank)
    step_fn = ResidentStep(ddp_model, opt, images, train_labels.to(device), config, params, data_gen, mix_gen, autocast, share)
    log.info("resident loop on %s: AdamW %s, %s, %s", device, kind, "bf16 autocast" if autocast else "fp32",
             "compiled step" if params.compile else "eager step")

    state = TrainState(epoch=0, history=[])
    if checkpoint is not None and params.resume and checkpoint.exists():
        restored = _restore(checkpoint, model, opt, gens, device, fingerprint)
        if restored is not None:
            state = restored
            log.info("resumed from %s after epoch %d", checkpoint, state.epoch)
    if on_epoch is not None and dist_info.is_main:
        for row in state.history:
            on_epoch(row)

    for epoch in range(state.epoch, params.epochs):
        perm = torch.randperm(n, generator=data_gen, device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        batches = progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{params.epochs}", unit="batch")
        for step_in_epoch in batches:
            lr = lr_at(epoch * steps_per_epoch + step_in_epoch, total_steps, warmup, params.lr, params.min_lr)
            idx = perm[step_in_epoch * params.batch_size : (step_in_epoch + 1) * params.batch_size]
            loss, batch_correct, count = step_fn(idx, lr)
            loss_sum += loss.double() * count
            correct += batch_correct
            seen += count
        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=device)])
        if dist_info.world > 1:  # each rank saw its own share of every batch: report the whole epoch
            dist.all_reduce(totals)
        loss_total, correct_total, seen_total = totals.tolist()  # the epoch's one read-back
        row = {"epoch": epoch + 1, "train_loss": loss_total / max(seen_total, 1), "train_accuracy": correct_total / max(seen_total, 1)}
        if dist_info.is_main:
            amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
            with amp:
                ev = evaluate(model, test_on_device, test_labels, config, device, batch_size=max(per_rank, 256))
            row.update(test_accuracy=ev.accuracy, head_usage=ev.head_usage, head_usage_per_block=ev.head_usage_per_block)
            log.info("epoch %d/%d: %s", epoch + 1, params.epochs, {k: v for k, v in rounded(row, 4).items() if k != "head_usage_per_block"})
        state = TrainState(epoch=epoch + 1, history=[*state.history, row])
        if on_epoch is not None and dist_info.is_main:
            on_epoch(row)
        if checkpoint is not None and dist_info.is_main:
            _save(checkpoint, model, opt, gens, device, state, fingerprint)
        if dist_info.world > 1:
            dist.barrier()
    model.eval()
    return state.history
