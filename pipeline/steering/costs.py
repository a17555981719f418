"""What `latency` writes: each policy's cost as deployed (`pipeline.steering.deploy.measure`), the
typed record metrics/details/latency.json holds, with its writer and its one reader (`report`
reads it without depending on the deployment code)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from pipeline.storage import read_dataclass, write_dataclass


@dataclass
class BatchLatency:
    batch_ms: float
    """Median milliseconds per batch: a round runs every full batch of the timed images once."""
    image_ms: float
    """batch_ms / batch size."""


@dataclass
class PolicyLatency:
    accuracy: float
    """On the timed images."""
    usage: dict[str, float]
    """str(gated block) -> mean fraction of its heads kept on the timed images."""
    gflops: float
    """Matmul GFLOPs per image of the model at the policy's gates (`FlopModel.image` with the
    mean kept heads per block): what the head-skipping path computes. The masked path computes
    every head whatever the gates (`LatencyDetails.gflops_dense`), so there the gates save
    nothing but are still what the FLOP model counts."""
    gflops_steering_overhead: float
    """What steering adds per image: the SAE's encoder and decoder matmuls on one CLS row per
    steered block (`steering_flops`); 0 for the unsteered model and the ceiling."""
    gflops_extra_pass: float
    """The unsteered pass `per_class_predicted` runs first to get its class; 0 for the others."""
    latency_ms: dict[str, BatchLatency]
    """str(batch size) -> measured time."""

    @property
    def gflops_total(self) -> float:
        return self.gflops + self.gflops_steering_overhead + self.gflops_extra_pass


@dataclass
class LatencySettings:
    rounds: int | None
    """None: nothing was timed (as for threads, cpu and torch_version)."""
    threads: int | None
    """torch.get_num_threads() while timing."""
    images: int
    """Images timed (each batch size runs its full batches of them)."""
    head_path: str
    batch_sizes: list[int]
    steered_blocks: list[int]
    mode: str
    keep_error: bool
    cpu: str | None = None
    """/proc/cpuinfo's model name (None where there is none)."""
    torch_version: str | None = None


@dataclass
class LatencyDetails:
    policies: dict[str, PolicyLatency]
    """`POLICIES` name -> its cost (the ceiling absent when no patterns were given)."""
    gflops_dense: float
    """Every head kept in every block."""
    settings: LatencySettings


def write_details(path: Path | str, details: LatencyDetails) -> None:
    write_dataclass(path, details)


def read_details(path: Path | str) -> LatencyDetails:
    return read_dataclass(LatencyDetails, path, rerun="latency")


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows, else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
