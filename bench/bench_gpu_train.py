"""Training throughput of `finetune` at the `cifar100-gpu` shape: the standard loop against the
resident loop, eager against compiled, per-image (torchvision) against batched augmentation, with
the model FLOP utilisation.

Each row runs the real loop (`training.train` or `fast_training.train_resident`) for `--epochs`
epochs of `--steps` batches on synthetic uint8 images of the configuration's size, with the
configuration's model, recipe (crop, flip, policy, MixUp / CutMix, bf16) and batch size; the
epoch times come from the loops' own `on_epoch` callbacks (each epoch ends with the loop's test
evaluation, here of 256 images). The first epoch (warm-up, compilation) is reported apart; the
rate is the median of the later epochs, and `x std` its ratio to the standard loop's (first row). The augmentation alone is timed per batch: torchvision's
per-image policy on the host and on the device against the batched policy on the device. On
CUDA it also checks that a resident step never waits for the GPU (sync debug mode `error`).

MFU = FLOPs per image x 3 (forward and backward) x images/s / the GPU's dense bf16 peak, the
FLOPs per image being `pipeline.model.flops`'s dense count (training computes every head).

    python bench/bench_gpu_train.py                                  # CUDA, configs/cifar100-gpu.yaml
    python bench/bench_gpu_train.py --batch-sizes 512,1024 --json out.json
    .venv/bin/python bench/bench_gpu_train.py --device cpu --tiny    # a dry run on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.model import batched_augment
from pipeline.model.fast_training import ResidentStep, make_optimizer, train_resident
from pipeline.model.flops import flop_model
from pipeline.model.gated_vit import build_gated_vit, model_config
from pipeline.model.training import apply_policy, train
from pipeline.params.file import load_params
from pipeline.params.finetune import FinetuneParams
from pipeline.params.model import ModelParams

BF16_DENSE_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12}
"""Dense bf16 Tensor Core peak by GPU name (SXM parts): NVIDIA's H100 / H200 datasheets give
1,979 TFLOP/s of bf16 "with sparsity", half of it dense. (This workplace measured 769-798 TFLOP/s
for a bf16 8192^3 matrix product on random data on one H200: /work/.library/device/KINDS.md.)"""

TINY_SHAPE = dict(embed_dim=48, depth=3, num_heads=3)
NUM_CLASSES = 100
TEST_IMAGES = 256

ROWS = [  # (name, loop, augmentation, compiled, policy override or None)
    ("standard loop", "standard", "per-image (host)", False, None),
    ("standard loop, no policy", "standard", "crop+flip only (host)", False, "none"),
    ("resident loop", "resident", "batched (device)", False, None),
    ("resident loop", "resident", "batched (device)", True, None),
    ("resident loop, no policy", "resident", "crop+flip only (device)", True, "none"),
]


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (given)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in BF16_DENSE_PEAK_FLOPS.items():
            if key in name:
                return peak, f"{peak / 1e12:g} TFLOP/s dense bf16 ({name})"
        return None, f"unknown for {name}: pass --peak-tflops"
    return None, "n/a on a CPU (pass --peak-tflops)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(loop: str, compiled: bool, policy: str | None, model_params: ModelParams, fp: FinetuneParams, data: dict[str, torch.Tensor],
            device: torch.device, epochs: int) -> dict[str, Any]:
    """One loop for `epochs` epochs: seconds of each epoch (the loop's own epoch boundaries)."""
    update: dict[str, Any] = {"loop": loop, "compile": compiled, "epochs": epochs, "warmup_epochs": min(fp.warmup_epochs, 1.0)}
    if policy is not None:
        update["augment"] = fp.augment.model_copy(update={"policy": policy})
    params = fp.model_copy(update=update)
    torch.manual_seed(0)
    model = build_gated_vit(model_params, num_classes=NUM_CLASSES, tau=params.tau)
    config = model_config(model_params, model.vit, NUM_CLASSES, [str(i) for i in range(NUM_CLASSES)], params.tau)
    stamps: list[float] = []

    def on_epoch(row: dict[str, Any]) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    torch._dynamo.reset()
    fn = train_resident if loop == "resident" else train
    sync(device)
    start = time.perf_counter()
    history = fn(model, data["train"], data["labels"], data["test"], data["test_labels"], config, params, device, on_epoch=on_epoch)
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    return {"epoch_s": times, "train_loss": history[-1]["train_loss"], "model": model}


def time_augmentation(fp: FinetuneParams, images: torch.Tensor, device: torch.device, batch: int, repeat: int) -> dict[str, float]:
    """Milliseconds per batch of the configuration's policy: torchvision per image on the host
    and on the device, and batched on the device."""
    params = fp.augment if fp.augment.policy != "none" else fp.augment.model_copy(update={"policy": "trivialaugment"})
    host = images[:batch].cpu()
    dev = images[:batch].to(device)
    gen_host = torch.Generator().manual_seed(0)
    gen_dev = torch.Generator(device=device).manual_seed(0)
    cases = {
        "per-image torchvision, host": lambda: apply_policy(host, params, gen_host),
        f"per-image torchvision, {device.type}": lambda: apply_policy(dev, params, gen_host),
        f"batched, {device.type}": lambda: batched_augment.apply_policy(dev, params, gen_dev),
    }
    out = {}
    for name, fn in cases.items():
        fn()
        sync(device)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - start)
        out[name] = statistics.median(times) * 1000
    return out


def check_no_sync(model_params: ModelParams, fp: FinetuneParams, data: dict[str, torch.Tensor], device: torch.device) -> str:
    """Three resident steps (eager, the full recipe) under CUDA's sync debug mode `error`."""
    if device.type != "cuda":
        return "not checked (CUDA only)"
    params = fp.model_copy(update={"loop": "resident", "compile": False})
    torch.manual_seed(0)
    model = build_gated_vit(model_params, num_classes=NUM_CLASSES, tau=params.tau).to(device).train()
    config = model_config(model_params, model.vit, NUM_CLASSES, [str(i) for i in range(NUM_CLASSES)], params.tau)
    opt, _ = make_optimizer(model, params)
    step = ResidentStep(model, opt, data["train"].to(device), data["labels"].to(device), config, params,
                        torch.Generator(device=device).manual_seed(0), torch.Generator().manual_seed(1),
                        autocast=params.precision == "bf16")
    idx = torch.arange(params.batch_size, device=device)
    step(idx, params.lr)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(idx, params.lr)
    except RuntimeError as exc:
        return f"FAILED: a step synchronises ({str(exc).splitlines()[0][:160]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return "ok: no host synchronisation in a resident step"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cifar100-gpu.yaml")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help=f"a small model ({TINY_SHAPE}), batch 32, 3 steps: a dry run")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default: the configuration's)")
    ap.add_argument("--steps", type=int, default=30, help="batches per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per row (the first is warm-up)")
    ap.add_argument("--rows", default=None, help="comma-separated row numbers to run (default: all)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for the MFU (default: by GPU name)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    params = load_params(args.config)
    model_params, fp = params.model, params.finetune
    if args.tiny:
        model_params = model_params.model_copy(update=TINY_SHAPE)
        fp = fp.model_copy(update={"batch_size": 32})
        args.steps, args.epochs = min(args.steps, 3), min(args.epochs, 2)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [fp.batch_size]
    rows = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    peak, peak_note = peak_flops(device, args.peak_tflops)
    size = model_params.img_size
    gen = torch.Generator().manual_seed(0)
    flops = None
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                               "torch": torch.__version__, "config": args.config, "model": model_params.model_dump(),
                               "precision": fp.precision, "augment": fp.augment.model_dump(), "peak_flops": peak, "rows": []}
    print(f"device {results['device']}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"model {dict((k, getattr(model_params, k)) for k in ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads'))}; "
          f"precision {fp.precision}; policy {fp.augment.policy}, mixup {fp.augment.mixup_alpha}, cutmix {fp.augment.cutmix_alpha}; "
          f"peak {peak_note}")
    for batch in batch_sizes:
        fp_b = fp.model_copy(update={"batch_size": batch})
        n = batch * args.steps
        data = {"train": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen),
                "labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen),
                "test": torch.randint(0, 256, (TEST_IMAGES, 3, size, size), dtype=torch.uint8, generator=gen),
                "test_labels": torch.randint(0, NUM_CLASSES, (TEST_IMAGES,), generator=gen)}
        print(f"\nbatch {batch}, {args.steps} steps per epoch, {args.epochs} epochs per row")
        print(f"{'loop':<26}{'augmentation':<26}{'step':<10}{'images/s':>10}{'x std':>7}{'epoch s':>9}{'first s':>9}{'MFU':>8}")
        reference = None
        for name, loop, aug, compiled, policy in rows:
            r = run_row(loop, compiled, policy, model_params, fp_b, data, device, args.epochs)
            if flops is None:
                flops = flop_model(r["model"]).dense
                results["gflops_per_image_forward"] = flops / 1e9
            steady = statistics.median(r["epoch_s"][1:]) if len(r["epoch_s"]) > 1 else r["epoch_s"][0]
            rate = n / steady
            mfu = 3 * flops * rate / peak if peak else None
            step_name = "compiled" if compiled else "eager"
            if (loop, policy) == ("standard", None):
                reference = rate  # the standard loop with the configuration's policy: what runs today
            ratio = f"{rate / reference:.2f}" if reference else "-"
            print(f"{name:<26}{aug:<26}{step_name:<10}{rate:>10,.0f}{ratio:>7}{steady:>9.2f}{r['epoch_s'][0]:>9.2f}"
                  f"{(f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'):>8}")
            results["rows"].append({"batch": batch, "loop": loop, "augmentation": aug, "step": step_name, "images_per_s": rate,
                                    "vs_standard": rate / reference if reference else None,
                                    "epoch_s": r["epoch_s"], "mfu": mfu, "train_loss": r["train_loss"]})
        ms = time_augmentation(fp_b, data["train"], device, batch, repeat=3 if args.tiny else 10)
        print(f"augmentation alone ({fp_b.augment.policy if fp_b.augment.policy != 'none' else 'trivialaugment'}), ms per batch of {batch}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
        results.setdefault("augmentation_ms", {})[str(batch)] = ms
        check = check_no_sync(model_params, fp_b, data, device)
        print(f"host synchronisation check: {check}")
        results.setdefault("sync_check", {})[str(batch)] = check
    print(f"\nFLOPs per image (forward, dense): {flops / 1e9:.3f} GFLOP; MFU = 3 x that x images/s / peak")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
