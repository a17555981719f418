"""Batched TrivialAugment and RandAugment on uint8 (B, C, H, W) image tensors, on any device.

torchvision's v2 policies (`TrivialAugmentWide`, `RandAugment`) draw each image's op and strength
from torch's global RNG and run image by image in Python: 60 ms per 256-image batch on an H200
(docs/results/cifar100-gpu), more than the training step itself. Here every image's op, magnitude
bin and sign are drawn at once from a `torch.Generator` on the images' device, every op runs on
the whole batch as tensor ops, and each image keeps the result of its own op: no Python loop over
images and no host synchronisation (nothing reads a device value back), so it runs inside the
resident training loop (`pipeline.model.fast_training`) at the GPU's pace.

The op set, its order and the magnitude bins are torchvision 0.29's (`TrivialAugmentWide`: 14 ops
including Identity, 31 bins; `RandAugment` v2: the same 14 ops, its own magnitude ranges, at one
fixed bin), and every op follows torchvision's functional op on uint8 tensors step by step:
geometric ops by the same inverse affine matrix, sampling grid and nearest `grid_sample` (fill 0),
rotations by multiples of 90 degrees by `rot90` as torchvision does, colour ops by the same blends.
Per op at a fixed magnitude, an image's result equals torchvision's on that image: on the CPU
exactly, for every op at every bin and sign (tests/test_fast_training.py). The blends (Color,
Contrast, Sharpness) emulate the fused multiply-add torch uses there (`add_(other, alpha)`) by one
float64 sum rounded once to float32. On a GPU, float rounding may differ from the CPU's: a blend
may then be one grey level off where a value falls on a rounding boundary, and a shear or a
general rotation may take the neighbouring source pixel where a source coordinate falls within
rounding of a nearest-neighbour tie. The draws cannot equal torchvision's (another random
stream, drawn per batch rather than per image).

Every colour op runs for every image and the geometric ones as one warp (one matrix per image);
each image then keeps its own op's result: nine batched ops per policy step instead of one op
per image, with no data-dependent shapes (no host synchronisation, graph-capturable). Its cost
per batch against torchvision's per-image loop: bench/bench_gpu_train.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.params.finetune import AugmentParams

OPS: tuple[str, ...] = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)
"""The ops of torchvision's `TrivialAugmentWide` and v2 `RandAugment`, in their order."""
SIGNED: frozenset[str] = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"})
"""Ops whose magnitude is negated with probability 1/2."""
NUM_BINS = 31
"""Magnitude bins of both policies (torchvision's default `num_magnitude_bins`)."""


# ------------------------------------------------------------------------------- magnitudes
def _posterize_bits(num_bins: int, span: int) -> Tensor:
    return (8 - (torch.arange(num_bins) / ((num_bins - 1) / span))).round().int()


def magnitude_table(policy: str, height: int, width: int, num_bins: int = NUM_BINS) -> Tensor:
    """(len(OPS), num_bins) float64: the magnitude of every op at every bin, as torchvision's
    augmentation spaces give them (computed in float32 as there; 0 for ops without one)."""
    if policy == "trivialaugment":
        lin = {"ShearX": 0.99, "ShearY": 0.99, "TranslateX": 32.0, "TranslateY": 32.0, "Rotate": 135.0,
               "Brightness": 0.99, "Color": 0.99, "Contrast": 0.99, "Sharpness": 0.99}
        bits_span = 6
    elif policy == "randaugment":
        lin = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150.0 / 331.0 * width, "TranslateY": 150.0 / 331.0 * height,
               "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9, "Sharpness": 0.9}
        bits_span = 4
    else:
        raise ValueError(f"no batched policy {policy!r}: trivialaugment or randaugment")
    table = torch.zeros(len(OPS), num_bins, dtype=torch.float64)
    for i, name in enumerate(OPS):
        if name in lin:
            table[i] = torch.linspace(0.0, lin[name], num_bins).double()
        elif name == "Posterize":
            table[i] = _posterize_bits(num_bins, bits_span).double()
        elif name == "Solarize":
            table[i] = torch.linspace(1.0, 0.0, num_bins).double()
    return table


@functools.lru_cache(maxsize=32)
def _device_tables(policy: str, height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The magnitude table and the signed-op mask on `device`, copied there once (a copy from
    host memory waits for the device: not in every step)."""
    signed = torch.tensor([name in SIGNED for name in OPS])
    return magnitude_table(policy, height, width).to(device), signed.to(device)


@dataclass(frozen=True)
class Draws:
    """One op per image: its index into `OPS` and its signed magnitude."""

    op: Tensor
    """(B,) int64."""
    magnitude: Tensor
    """(B,) float64."""


def draw(batch: int, policy: str, height: int, width: int, generator: torch.Generator, magnitude_bin: int | None = None) -> Draws:
    """Each image's op (uniform over `OPS`), magnitude bin (uniform over the 31 bins, or the fixed
    `magnitude_bin`) and sign (+ or - with probability 1/2 for `SIGNED` ops), from `generator` on
    its own device. Always three draws of `batch` values, whatever they select."""
    device = generator.device
    op = torch.randint(len(OPS), (batch,), generator=generator, device=device)
    if magnitude_bin is None:
        bins = torch.randint(NUM_BINS, (batch,), generator=generator, device=device)
    else:
        bins = torch.full((batch,), magnitude_bin, dtype=torch.int64, device=device)
    negate = torch.rand(batch, generator=generator, device=device) <= 0.5
    table, signed = _device_tables(policy, height, width, device)
    magnitude = table[op, bins]
    return Draws(op=op, magnitude=torch.where(negate & signed[op], -magnitude, magnitude))


# --------------------------------------------------------------------------- geometric ops
def _inverse_affine(center: tuple[Tensor, Tensor], angle: Tensor, translate: tuple[Tensor, Tensor], shear: tuple[Tensor, Tensor]) -> Tensor:
    """(B, 2, 3) float64 inverse affine matrices, torchvision's `_get_inverse_affine_matrix` at
    scale 1 for per-image angles, translations and shears (degrees, pixels)."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear[0]), torch.deg2rad(shear[1])
    cx, cy = center
    tx, ty = translate
    cos_sy, tan_sx = torch.cos(sy), torch.tan(sx)
    a = torch.cos(rot - sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot - sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    cx_tx, cy_ty = cx + tx, cy + ty
    m2 = cx - m0 * cx_tx - m1 * cy_ty
    m5 = cy - m3 * cx_tx - m4 * cy_ty
    return torch.stack([m0, m1, m2, m3, m4, m5], -1).view(-1, 2, 3)


def _warp(images: Tensor, matrix: Tensor) -> Tensor:
    """Nearest-neighbour warp of every image by its own inverse affine matrix, fill 0, as
    torchvision's `_affine_grid` and `_apply_grid_transform` (output size = input size)."""
    b, _, h, w = images.shape
    device = images.device
    theta = matrix.float()
    base = torch.empty(1, h, w, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    t = theta.transpose(1, 2)
    rescaled = torch.stack([t[..., 0] / (0.5 * w), t[..., 1] / (0.5 * h)], -1)  # scalars: no host-to-device copy
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(rescaled).view(b, h, w, 2)
    out = F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(images.dtype)


def _matrix(name: str, m: Tensor, h: int, w: int) -> Tensor:
    """(B, 2, 3) inverse matrices of geometric op `name` at magnitudes `m`, as torchvision's
    policies call `affine` / `rotate`: shears by `degrees(atan(m))` about the top-left corner
    (`center=[0, 0]`), translations by `int(m)` whole pixels (truncated toward zero), rotations
    by `m` degrees counter-clockwise about the centre."""
    z = torch.zeros_like(m)
    if name == "ShearX":
        return _inverse_affine((z - w * 0.5, z - h * 0.5), z, (z, z), (torch.rad2deg(torch.atan(m)), z))
    if name == "ShearY":
        return _inverse_affine((z - w * 0.5, z - h * 0.5), z, (z, z), (z, torch.rad2deg(torch.atan(m))))
    if name == "TranslateX":
        return _inverse_affine((z, z), z, (torch.trunc(m), z), (z, z))
    if name == "TranslateY":
        return _inverse_affine((z, z), z, (z, torch.trunc(m)), (z, z))
    if name == "Rotate":
        return _inverse_affine((z, z), -torch.remainder(m, 360.0), (z, z), (z, z))
    raise ValueError(f"{name} is not a geometric op")


GEOMETRIC: tuple[str, ...] = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def _exact_rotations(images: Tensor, angle: Tensor, warped: Tensor) -> Tensor:
    """torchvision rotates by 0 and 180 degrees, and by 90 and 270 on square images, with exact
    transposes rather than the warp: the same here, per image."""
    h, w = images.shape[-2:]
    exact = [(0.0, images), (180.0, torch.rot90(images, 2, dims=(-2, -1)))]
    if h == w:
        exact += [(90.0, torch.rot90(images, 1, dims=(-2, -1))), (270.0, torch.rot90(images, 3, dims=(-2, -1)))]
    for value, rotated in exact:
        warped = torch.where((angle == value)[:, None, None, None], rotated, warped)
    return warped


def geometric(images: Tensor, op: Tensor, m: Tensor) -> Tensor:
    """Every image warped by its own geometric op (`OPS[op]`, which must be in `GEOMETRIC` for
    the result to mean anything): one matrix per image, one warp for the whole batch."""
    h, w = images.shape[-2:]
    matrix = _matrix("Rotate", m, h, w)
    for name in GEOMETRIC[:-1]:
        matrix = torch.where((op == OPS.index(name))[:, None, None], _matrix(name, m, h, w), matrix)
    warped = _warp(images, matrix)
    angle = torch.where(op == OPS.index("Rotate"), torch.remainder(m, 360.0), torch.full_like(m, -1.0))
    return _exact_rotations(images, angle, warped)


def _single(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    def apply(images: Tensor, m: Tensor) -> Tensor:
        return geometric(images, torch.full(m.shape, OPS.index(name), dtype=torch.int64, device=m.device), m)

    apply.__name__ = apply.__qualname__ = name.lower()
    apply.__doc__ = f"{name} of every image at its own magnitude (`geometric` with one op)."
    return apply


shear_x, shear_y, translate_x, translate_y, rotate = (_single(name) for name in GEOMETRIC)


# ------------------------------------------------------------------------------- colour ops
def _per_image(v: Tensor) -> Tensor:
    return v[:, None, None, None]


def _blend(images: Tensor, other: Tensor, m: Tensor) -> Tensor:
    """torchvision's `_blend(images, other, 1 + m)`: `images * r + (1 - r) * other` clamped and
    truncated to uint8, where torch computes the sum as a fused multiply-add (`add_(other, alpha)`);
    emulated here by one float64 sum of the exact product, rounded once to float32."""
    ratio = 1.0 + m
    scaled = images.float() * _per_image(ratio.float())
    alpha = _per_image((1.0 - ratio).float()).double()
    mixed = (scaled.double() + other.double() * alpha).float()
    return mixed.clamp_(0, 255).to(images.dtype)


def _grayscale(images: Tensor) -> Tensor:
    """torchvision's float grayscale of uint8 RGB (ITU-R 601-2 luma), floored; (B, 1, H, W)."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3).floor_()


def brightness(images: Tensor, m: Tensor) -> Tensor:
    return images.float().mul_(_per_image((1.0 + m).float())).clamp_(0, 255).to(images.dtype)


def color(images: Tensor, m: Tensor) -> Tensor:
    """Saturation: blend with the grayscale image (a 1-channel image is returned as it is)."""
    if images.shape[-3] == 1:
        return images
    return _blend(images, _grayscale(images), m)


def contrast(images: Tensor, m: Tensor) -> Tensor:
    """Blend with the mean of the grayscale image."""
    gray = _grayscale(images) if images.shape[-3] == 3 else images.float()
    return _blend(images, gray.mean(dim=(-3, -2, -1), keepdim=True), m)


def sharpness(images: Tensor, m: Tensor) -> Tensor:
    """Blend the interior pixels with a 3x3 smoothing (1s around a 5, over 13), rounded; the
    one-pixel border stays."""
    c, h, w = images.shape[-3:]
    if h <= 2 or w <= 2:
        return images
    kernel = torch.full((c, 1, 3, 3), 1.0 / 13.0, dtype=torch.float32, device=images.device)  # made there: no copy
    kernel[..., 1, 1] = 5.0 / 13.0
    out = images.float()
    blurred = F.conv2d(out, kernel, groups=c).round_()
    view = out[..., 1:-1, 1:-1]
    alpha = _per_image((1.0 - (1.0 + m)).float()).double()
    view.copy_((view.double() + (blurred - view).double() * alpha).float())
    return out.clamp_(0, 255).to(images.dtype)


def posterize(images: Tensor, m: Tensor) -> Tensor:
    """Keep the `int(m)` highest bits of every channel value."""
    bits = m.long()
    mask = ((1 << bits) - 1) << (8 - bits)
    return images & _per_image(mask.to(images.dtype))


def solarize(images: Tensor, m: Tensor) -> Tensor:
    """Invert every value >= 255 m (the threshold compared in float32, as torchvision does)."""
    threshold = _per_image((255.0 * m).float())
    return torch.where(images >= threshold, images.bitwise_not(), images)


def autocontrast(images: Tensor, m: Tensor | None = None) -> Tensor:
    """Stretch every channel to [0, 255] (a constant channel stays)."""
    x = images.float()
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    inv_scale = (high - low).mul_(1.0 / 255)
    low = torch.where(flat, torch.zeros_like(low), low)
    inv_scale = torch.where(flat, torch.ones_like(inv_scale), inv_scale)
    return x.sub_(low).div_(inv_scale).clamp_(0, 255).to(images.dtype)


def equalize(images: Tensor, m: Tensor | None = None) -> Tensor:
    """Histogram equalisation per channel with PIL's lookup table (torchvision's), a channel
    whose non-maximal pixels are too few staying as it is."""
    batch_shape = images.shape[:-2]
    flat = images.flatten(start_dim=-2).long()
    hist = flat.new_zeros(batch_shape + (256,), dtype=torch.int32)
    hist.scatter_add_(-1, flat, hist.new_ones(1).expand_as(flat))
    cum = hist.cumsum(-1)
    last = cum.argmax(-1, keepdim=True)  # the image's largest value: its cumulative count is first full
    non_max = flat.shape[-1] - hist.gather(-1, last)
    step = non_max.div(255, rounding_mode="floor")
    valid = step.ne(0).unsqueeze(-1)
    lut = (cum[..., :-1] + step // 2).div(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255).to(torch.uint8)
    lut = torch.cat([lut.new_zeros(batch_shape + (1,)), lut], dim=-1)
    equalized = lut.gather(-1, flat).view_as(images)
    return torch.where(valid, equalized, images)


def identity(images: Tensor, m: Tensor | None = None) -> Tensor:
    return images


OP_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Identity": identity, "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y,
    "Rotate": rotate, "Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness,
    "Posterize": posterize, "Solarize": solarize, "AutoContrast": autocontrast, "Equalize": equalize,
}
"""Each op on a whole batch, one magnitude per image ((B,) float64)."""


# ------------------------------------------------------------------------------- policies
def apply_ops(images: Tensor, draws: Draws) -> Tensor:
    """Image i gets op `OPS[draws.op[i]]` at `draws.magnitude[i]` (uint8 in, uint8 out). Every
    colour op runs on the whole batch, the geometric ones as one warp; each image keeps its own."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"batched augmentation takes uint8 (B, C, H, W) images, not {images.dtype} {tuple(images.shape)}")
    warped = geometric(images, draws.op, draws.magnitude)
    results = torch.stack([warped if name in GEOMETRIC else OP_FUNCTIONS[name](images, draws.magnitude) for name in OPS])
    return results[draws.op, torch.arange(len(images), device=images.device)]


def trivial_augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """TrivialAugment Wide: one op of a random bin per image."""
    h, w = images.shape[-2:]
    return apply_ops(images, draw(len(images), "trivialaugment", h, w, generator))


def rand_augment(images: Tensor, generator: torch.Generator, num_ops: int = 2, magnitude: int = 9) -> Tensor:
    """RandAugment: `num_ops` ops in turn per image, each at bin `magnitude` of 31."""
    if not 0 <= magnitude < NUM_BINS:
        raise ValueError(f"RandAugment magnitude {magnitude} must be a bin in 0..{NUM_BINS - 1}")
    h, w = images.shape[-2:]
    for _ in range(num_ops):
        images = apply_ops(images, draw(len(images), "randaugment", h, w, generator, magnitude_bin=magnitude))
    return images


def apply_policy(images: Tensor, params: AugmentParams, generator: torch.Generator) -> Tensor:
    """`params.policy` batched (the resident loop's counterpart of `training.apply_policy`)."""
    if params.policy == "trivialaugment":
        return trivial_augment(images, generator)
    if params.policy == "randaugment":
        return rand_augment(images, generator, params.randaugment_ops, params.randaugment_magnitude)
    return images


def crop_flip(images: Tensor, params: AugmentParams, generator: torch.Generator) -> Tensor:
    """Random crop after zero padding and random horizontal flip, drawn from `generator` on its
    own device. The draws and the arithmetic are `training.augment`'s, so with a CPU generator the
    two give the same images from the same generator state."""
    b, c, h, w = images.shape
    device = images.device
    gen_device = generator.device
    if params.crop_padding:
        p = params.crop_padding
        padded = F.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=gen_device).to(device)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=gen_device).to(device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(b, device=device)[:, None, None, None]
        chans = torch.arange(c, device=device)[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if params.hflip:
        flip = (torch.rand(b, generator=generator, device=gen_device) < 0.5).to(device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images


def augment_batch(images: Tensor, params: AugmentParams, generator: torch.Generator) -> Tensor:
    """Crop, flip and the per-image policy, all batched on the images' device (uint8 in, uint8 out)."""
    return apply_policy(crop_flip(images, params, generator), params, generator)
