"""User-facing errors.

Anything a user can fix (a typo, a missing file, a bad value) is raised as a ``UserError``. The
CLI prints its message as one paragraph and exits with code 2, never with a traceback; real bugs
stay ordinary exceptions so they keep their traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

USAGE_EXIT_CODE = 2


class UserError(Exception):
    """A problem in the user's input, with a message that names the fix."""

    exit_code = USAGE_EXIT_CODE

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        if not self.hint:
            return self.message
        separator = "" if self.message.endswith("\n") else " "
        return f"{self.message}{separator}{self.hint}"


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """Return the candidate most similar to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str], quote: str = "`") -> str:
    """A ' did you mean `x`?' suffix, or '' when no candidate is close."""
    match = closest(name, candidates)
    return f" Did you mean {quote}{match}{quote}?" if match else ""
