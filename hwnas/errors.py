"""User-facing errors.

Every error a user can cause (bad data, a bad arch string, a missing file) is raised as a
:class:`HwnasError` whose message names the problem *and* the fix. The CLI prints it on one
line and exits non-zero; it never shows a traceback for these.
"""


class HwnasError(Exception):
    """An error caused by input or environment, with a message that says how to fix it."""


class DataError(HwnasError):
    """Unreadable, missing or unusable data."""


class SpaceError(HwnasError):
    """An invalid search-space spec or architecture."""
