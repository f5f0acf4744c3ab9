"""The one exception the command turns into an ``error:`` line (no traceback) and exit code 2."""


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line on stderr, no traceback."""
