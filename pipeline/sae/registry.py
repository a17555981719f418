"""Every SAE kind by name, and the SAE file format: safetensors weights plus a config.json
whose `format` names the kind, so `load_sae` rebuilds whichever architecture was trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.sae.base import SparseAutoencoder
from pipeline.sae.batchtopk import BatchTopKSAE, MatryoshkaSAE
from pipeline.sae.jumprelu import JumpReLUSAE
from pipeline.sae.topk import FrozenRandomSAE, TopKSAE
from pipeline.storage import load_weights, save_weights

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    cls.ARCHITECTURE: cls for cls in (TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, FrozenRandomSAE)
}
"""Every SAE kind, by `sae.architecture`."""


def save_sae(directory: Path | str, sae: SparseAutoencoder, extra_config: dict[str, Any]) -> None:
    """Write safetensors weights plus config.json; the SAE's own config keys win over extras."""
    save_weights(directory, sae.state_dict(), {**extra_config, **sae.config()})


def load_sae(directory: Path | str) -> SparseAutoencoder:
    """Load an SAE written by save_sae (on the CPU), of whichever registered architecture its
    config names; any mismatch is a clear PipelineError."""
    state, config = load_weights(directory)
    by_format = {cls.FORMAT: cls for cls in ARCHITECTURES.values()}
    cls = by_format.get(config.get("format"))
    if cls is None:
        raise PipelineError(f"{directory}: not an SAE this pipeline knows (config format {config.get('format')!r}; known {sorted(by_format)})")
    try:
        sae = cls.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"{directory}/config.json: bad or missing SAE field ({exc})") from None
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}  # parameters and buffers
    for name, shape in expected.items():
        if name not in state:
            raise PipelineError(f"{directory}: weights lack tensor '{name}'")
        if tuple(state[name].shape) != shape:
            raise PipelineError(f"{directory}: tensor '{name}' has shape {tuple(state[name].shape)}, config implies {shape}")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise PipelineError(f"{directory}: unexpected tensors {unknown}")
    with torch.no_grad():
        for name, tensor in sae.state_dict(keep_vars=True).items():
            tensor.copy_(state[name].to(tensor.dtype))  # copy_ keeps W_dec's memory layout
    return sae
