"""User-facing errors.

A `UserError` is bad input that the user can fix: the CLI prints its message as one line and exits
with code 2, without a traceback. Library code raises it wherever the message can name the problem
and the fix; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: one line that names the problem and the fix (exit code 2)."""

    exit_code = 2


class Interrupted(UserError):
    """Ctrl-C during long work: one line that says what was kept and how to continue (exit code 130)."""

    exit_code = 130
