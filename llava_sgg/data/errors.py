"""The one error type for bad training data."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DataError"]

# Enough to see the pattern of a problem without flooding the terminal on a
# 665k-sample file where one systematic mistake hits every sample.
MAX_LISTED = 20


class DataError(ValueError):
    """A problem with the data (a file, a sample, an image), as opposed to the configuration.

    ``problems`` holds one line per problem, each naming the file, the line or
    sample index, and the sample id; the message lists the first
    :data:`MAX_LISTED` of them after the count.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]

    @classmethod
    def from_problems(cls, what: str, problems: Sequence[str], hint: str = "") -> DataError:
        """One error reporting every problem: ``"<what>: N problems (first 20 shown):"`` then a line each,
        then ``hint`` (what the user can do), last so that it is what a terminal shows."""
        shown = problems[:MAX_LISTED]
        head = f"{what}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
        if len(problems) > MAX_LISTED:
            head += f" (first {MAX_LISTED} shown)"
        return cls("\n  ".join([head + ":", *shown]) + (f"\n{hint[0].upper()}{hint[1:]}" if hint else ""), problems)
