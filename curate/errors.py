"""Errors a user can act on.

Every failure caused by input (a file, a column, a value, a query) is raised as
:class:`CurateError` with a one-line message that names the file, row, column or value; the
CLI prints it as ``error: ...`` and exits non-zero. Anything else is a bug and keeps its traceback.
"""


class CurateError(Exception):
    """An error in the user's input, reported as one clear line."""
