"""The one exception type a user sees: everything that is not a bad parameter."""


class PipelineError(RuntimeError):
    """A user-facing failure (bad input file, missing download, ...): message shown verbatim."""
