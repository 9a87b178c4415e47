"""The base of every error that is the user's to fix, and the one line a report of any error names.

Every module raises its own subclass of UserError; the entry scripts catch UserError alone
(ddp.exit_as_promised), so a new kind of bad input needs no list kept by hand.
"""


class UserError(Exception):
    """Bad input from the user: reported as one line naming the file and the fix, exit code 2, no traceback."""


def first_line(err):
    """The first line of an exception's message (its type when it has none): what a one-line report names."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__
