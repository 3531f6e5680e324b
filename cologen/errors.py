"""Errors the user fixes. Commands print them as one line naming the fix (no traceback) and exit with status 2.

`UsageError` is a ValueError and `MissingInput` also a FileNotFoundError, so code that catches those keeps working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input the user can fix (a config key, a path, a file); the message is one line and names the fix."""


class MissingInput(UsageError, FileNotFoundError):
    """A file or folder the command needs is not there; the message says which command writes it."""


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error's message, shortened (for third-party errors quoted in ours)."""
    text = str(err).strip()
    line = next((s.strip() for s in text.splitlines() if s.strip()), "") or type(err).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."
