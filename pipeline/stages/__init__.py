"""One thin module per DVC stage: each `run(params)` reads its deps and writes its outs."""
