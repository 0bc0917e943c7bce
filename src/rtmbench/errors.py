"""The one exception type the CLI and pytest turn into a single clear line."""


class RtmbenchError(Exception):
    """Bad input or a failed step, with a message that names the file and the problem."""
