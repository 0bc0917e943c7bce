"""The one exception type the CLI and pytest turn into a single clear line."""


class RtmbenchError(Exception):
    """Bad input or a failed step, with a message that names the file and the problem."""


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (SDK errors span many), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
