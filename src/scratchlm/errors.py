"""The one exception type for mistakes a user can fix (bad path, config typo, corrupt file).

`scratchlm.cli.main` turns it into a single `error: ...` line and exit code 2; anything else
that escapes is a bug in scratchlm and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line with what to do about it."""
