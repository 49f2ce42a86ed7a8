"""The error every stage turns into a one-line message and exit status 2 (never a deep traceback)."""


class PipelineError(Exception):
    """Bad input or state that the user can fix; the message names the file or option at fault."""
