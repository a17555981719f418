"""One thin module per DVC stage: each `run` takes its params sections (`pipeline.cli.STAGE_SECTIONS`),
reads its deps, calls the library subpackages and writes its outs."""
