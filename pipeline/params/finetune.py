"""`finetune`: the training loop and its augmentation (read by `finetune` only)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.params.base import Device, Section


class AugmentParams(Section):
    """Training augmentation, applied at the data set's native resolution before resizing."""

    crop_padding: Annotated[int, Field(ge=0)] = 4
    """Random crop after zero-padding every side by this many pixels (0 disables)."""
    hflip: bool = True
    """Random horizontal flip with probability 0.5."""
    policy: Literal["none", "trivialaugment", "randaugment"] = "none"
    """A per-image policy of torchvision's v2 transforms after crop and flip: TrivialAugment
    (one random op of random strength) or RandAugment (`randaugment_ops` ops at
    `randaugment_magnitude`); what from-scratch ViTs on small data sets need. The `resident`
    loop runs the same ops and magnitude bins batched on the device
    (`pipeline.model.batched_augment`)."""
    randaugment_ops: Annotated[int, Field(ge=1, le=8)] = 2
    """RandAugment: operations per image."""
    randaugment_magnitude: Annotated[int, Field(ge=0, le=30)] = 9
    """RandAugment: strength of every operation (of 31 bins)."""
    mixup_alpha: Annotated[float, Field(ge=0)] = 0.0
    """MixUp: Beta(alpha, alpha) mixing of a batch with its reversal, labels mixed alike (0 off)."""
    cutmix_alpha: Annotated[float, Field(ge=0)] = 0.0
    """CutMix: a Beta(alpha, alpha)-sized box pasted from the reversed batch (0 off). With
    both on, each batch uses one of the two at random (as timm does)."""


class FinetuneParams(Section):
    """`finetune`: trains the gated ViT with cross-entropy plus the head-usage loss."""

    epochs: Annotated[int, Field(ge=1)] = 10
    """Passes over the training set."""
    batch_size: Annotated[int, Field(ge=1)] = 128
    """Global batch size (split evenly across torchrun processes)."""
    lr: Annotated[float, Field(gt=0)] = 1e-3
    """Peak AdamW learning rate (reached after warmup, then cosine decay to `min_lr`)."""
    min_lr: Annotated[float, Field(ge=0)] = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    """Linear warmup length, in epochs (fractions allowed)."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    """AdamW weight decay (not applied to biases, norms, embeddings or tokens)."""
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Cross-entropy label smoothing."""
    augment: AugmentParams = AugmentParams()
    """Training augmentation."""
    tau: Annotated[float, Field(gt=0)] = 5.0
    """Gumbel-sigmoid temperature of the training gates (AdaViT: 5)."""
    head_target: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Target mean head usage of the usage loss (AdaViT: 0.5)."""
    head_weight: Annotated[float, Field(ge=0)] = 2.0
    """Weight of the usage loss |mean(gates) - head_target| (AdaViT: 2.0)."""
    seed: int = 0
    """Seed of initialisation, shuffling, augmentation and Gumbel noise."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16` autocasts the forward on CUDA; the CPU always runs fp32."""
    num_workers: Annotated[int, Field(ge=0)] = 0
    """Threads that decode the data set's PNGs before training (0: main thread only)."""
    nproc: Annotated[int, Field(ge=1)] = 1
    """Processes per node; above 1 the stage runs under torchrun with DistributedDataParallel
    (gloo on CPU, nccl on GPU)."""
    resume: bool = False
    """Continue from the last epoch checkpoint in models/vit_ckpt/ if one exists."""
    loop: Literal["standard", "resident"] = "standard"
    """The training loop. `standard` (`pipeline.model.training.train`): the data set in host
    memory, crop and flip batched, the per-image policy through torchvision image by image, one
    host synchronisation per step; the same params give byte-identical models on one CPU.
    `resident` (`pipeline.model.fast_training.train_resident`), for GPUs: the data set on the
    training device as uint8, shuffling and every augmentation (the policy too) batched there
    from a device generator, fused AdamW, no host synchronisation inside an epoch, the per-epoch
    test evaluation under `precision`'s autocast. Same schedule, loss and outputs; other random
    streams, so its models differ from `standard`'s (deterministic on one machine)."""
    compile: bool = False
    """`resident` loop only: `torch.compile` the forward and loss of the training step (inductor;
    on a CPU it needs a C compiler). The first steps pay the compilation (tens of seconds); the
    compiled step draws its Gumbel noise from inductor's generator, so its gates' noise, and
    hence its model, differ from the eager step's."""

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneParams:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} must be <= lr {self.lr}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must be <= epochs {self.epochs}")
        if self.batch_size % self.nproc:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by nproc {self.nproc}")
        if self.compile and self.loop != "resident":
            raise ValueError("compile: true needs loop: resident (the standard loop is never compiled)")
        return self
