"""`train_sae_block@<b>`: the SAE on block b's CLS input, for each block b in `extract.layers`.

The same training as `train_sae` (the `sae` params, every block alike) on the column
`x_block<b>` of data/embeddings/{train,test}.parquet; written to models/sae_blocks/block<b>/,
metrics/sae_blocks/block<b>/ (the DVCLive log) and metrics/details/sae_blocks/block<b>.json.
dvc.yaml generates one stage per listed block from one `foreach` definition, so each block's SAE
is a cached output of its own; `steer` uses those of the blocks `steer.blocks` names.
"""

from __future__ import annotations

from pipeline.layout import train_sae_block as files
from pipeline.params.sae import SaeParams
from pipeline.stages.train_sae import fit


def run(cfg: SaeParams, block: int) -> None:
    fit(cfg, files.files(block), block)
