"""The controls' directions and their matched-norm move (docs/METHOD.md, section 6).

The decision network is linear in its input, so any direction moves the gates. A control asks
whether the SAE is what gives control: for image i and alpha a, the per-class SAE steer moves
the decision input by delta_i(a) = dec(z'_i) - dec(z_i); a control moves it by
sign(a) ||delta_i(a)|| u_i along a unit direction u_i instead, so both spend the same effort on
every image at every alpha, and a positive alpha pushes along u as amplifying pushes along the
latents' decoder directions.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.errors import PipelineError
from pipeline.model.gated_vit import GatedViT
from pipeline.steering.strategies import Directions


def class_mean_directions(x: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """(N, D) embeddings and (N,) labels (the training split) -> (C, D) unit directions
    mean(x | c) - mean(x); a class without images gets the zero direction (it is never moved)."""
    x = x.double()
    counts = torch.bincount(labels, minlength=n_classes)
    sums = torch.zeros(n_classes, x.shape[1], dtype=torch.float64).index_add_(0, labels, x)
    means = sums / counts.clamp(min=1)[:, None]
    offsets = torch.where((counts > 0)[:, None], means - x.mean(0), torch.zeros_like(means))
    return F.normalize(offsets, dim=1).float()


def gate_closing_direction(decision_weight: Tensor) -> Tensor:
    """(H, D) rows of the final block's decision network -> (D,) the unit direction along which
    the sum of its gate logits falls fastest: minus the normalised sum of the rows (the logits
    are W x + b, so their sum's gradient in x is the sum of W's rows)."""
    return F.normalize(-decision_weight.detach().double().sum(0), dim=0).float()


def random_directions(n_classes: int, dim: int, draws: int, seed: int) -> Tensor:
    """(draws, C, D) seeded directions uniform on the unit sphere (normalised Gaussians; stream
    seed + 2, apart from the random latent sets' seed and seed + 1)."""
    gen = torch.Generator().manual_seed(seed + 2)
    return F.normalize(torch.randn(draws, n_classes, dim, generator=gen, dtype=torch.float64), dim=-1).float()


def control_directions(train_x: Tensor, train_labels: Tensor, n_classes: int, decision_weight: Tensor, draws: int,
                       seed: int) -> Directions:
    """Every control's directions, from the training split's embeddings and the decision network."""
    return Directions(
        random=random_directions(n_classes, train_x.shape[1], draws, seed),
        class_mean=class_mean_directions(train_x, train_labels, n_classes),
        gate=gate_closing_direction(decision_weight),
    )


def directions_for(model: GatedViT, train_x: Tensor, train_labels: Tensor, draws: int, seed: int) -> Directions:
    """`control_directions` for this model: its classes, its final block's decision network."""
    return control_directions(train_x, train_labels, model.vit.num_classes, model.decision_net(model.depth - 1).weight, draws, seed)


def matched_input(x: Tensor, direction: Tensor, norm: Tensor, alpha: float) -> Tensor:
    """(B, D) inputs moved along (B, D) unit directions by (B, 1) norms, signed by alpha."""
    sign = (alpha > 0) - (alpha < 0)
    return x + (sign * norm) * direction


def write_directions(path: Path | str, directions: Directions) -> None:
    """The directions the controls moved along (data/steer/directions.safetensors), to inspect
    or to compare with the SAE's decoder directions."""
    save_file({f.name: getattr(directions, f.name).detach().cpu().contiguous() for f in fields(Directions)}, str(path))


def read_directions(path: Path | str) -> Directions:
    try:
        tensors = load_file(str(path))
        return Directions(**{f.name: tensors[f.name] for f in fields(Directions)})
    except (SafetensorError, OSError, KeyError) as exc:
        raise PipelineError(f"{path}: missing or malformed ({type(exc).__name__}: {exc}); rerun `steer`") from None
