"""Steering SAE latents to control dynamic head pruning in ViTs: the DVC pipeline's code.

Arrows point down only. `cli` (the `pipeline` command) calls `stages/<stage>.py`, one thin module
per DVC stage, which read their inputs, call the library subpackages and write their outputs:
`data/` (images and embeddings), `model/` (the gated ViT), `sae/`, `interpret/`, `steering/` and
`report/`. Below them lies the shared ground: `params/` (one typed section per `params.yaml`
section), `layout/` (every artifact's path, per stage), `storage`, `errors`, `checks`,
`runtime` and `progress`. `explore` and `export_pruned` are commands over a finished run.
"""
