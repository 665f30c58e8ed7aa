"""The one exception type that means "the user's input is wrong".

The CLI turns a :class:`UserError` into a single line on stderr and exit status 2; any other
exception is a bug or an environment failure and keeps its traceback (and, under MPI, aborts
the whole job).
"""


class UserError(Exception):
    """Bad input: a malformed option, a missing or mismatched file, unusable data."""
