"""``UsageError``: a mistake in what the user asked for (a flag, a path, a column), not a bug.

The ``hf-mmsel`` command line prints it as one line naming the fix and exits with code 2, without a traceback
(``--debug`` shows it). Library functions raise it (a ``ValueError``) where the message tells the user what to change.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad input that the user fixes by changing a flag, a path or a column name (the message says how)."""
