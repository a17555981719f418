"""Typed parameters: one pydantic model per `params.yaml` section, one module per section.

`base` holds what the sections share; `data`, `model`, `finetune`, `extract`, `sae`, `stats`,
`interpret` and `steer` one section each; `file` the root model over all of them, the loading
and validation of a params file, and `describe_params`. A stage imports only the sections it
reads, so an edit to one section's code reruns only the stages that read it.
"""
