"""The artifact layout: every path a stage reads or writes, defined once, in the module named
after the stage that writes it.

Each module holds its stage's paths plus `READS` (artifacts of earlier stages it reads, DVC
deps) and `WRITES` (exactly its DVC outs, metrics and plots). `dvc.yaml` spells the same paths,
since DVC cannot import them; tests/test_dvc_workflow.py checks that the two agree.

One module per stage keeps DVC's code dependencies precise: a stage depends on its own layout
and on the layouts of the stages it reads, so adding a stage (one new module here) or an output
to a late stage reruns nothing upstream. This file holds no code for the same reason.
"""
