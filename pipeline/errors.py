"""The two exception types a user sees; their messages are shown verbatim, without a traceback."""


class PipelineError(RuntimeError):
    """A user-facing failure (bad input file, missing download, ...): exit status 1."""


class ParamsError(ValueError):
    """A parameter file that cannot be used: the message names the key, the value and what is
    allowed; exit status 2, and nothing is written."""
