"""The one exception type that means "the user's input is wrong": the entry point prints its
message as a single line and exits non-zero, without a traceback."""


class PipelineError(Exception):
    """Bad input or an impossible request, with a message that names what and where."""
