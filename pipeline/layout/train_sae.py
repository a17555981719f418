"""`train_sae` writes the SAE (pipeline.sae) and its training record."""

from dataclasses import dataclass
from pathlib import Path

from pipeline.layout import extract

SAE = Path("models/sae")
"""model.safetensors + config.json."""
SAE_CONFIG = SAE / "config.json"
LOG = Path("metrics/sae")
"""The per-epoch DVCLive log (pipeline.report.live): its summary and its curves."""
METRICS = LOG / "metrics.json"
"""Headline numbers only: FVU, L0 and dead fraction on the test split (while training runs,
the test FVU after each epoch)."""
CURVES = LOG / "plots"
"""One TSV per epoch-level scalar: loss, AuxK loss, train and test FVU, L0, dead fraction."""
DETAILS = Path("metrics/details/sae.json")
"""Both splits' MSE, FVU, L0 and dead fraction; the SAE's shape; the per-epoch history."""

READS = (extract.EMBEDDINGS,)
WRITES = (SAE, METRICS, DETAILS, CURVES)


@dataclass(frozen=True)
class SaeFiles:
    """Where one SAE and its record go: the final block's here, block b's in `train_sae_block`."""

    sae: Path
    log: Path
    details: Path

    @property
    def writes(self) -> tuple[Path, ...]:
        return (self.sae, self.log / "metrics.json", self.details, self.log / "plots")


FINAL = SaeFiles(SAE, LOG, DETAILS)
