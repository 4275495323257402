"""The single exception type raised by :mod:`certdist.data` for bad or missing data files."""
from __future__ import annotations

__all__ = ["DataError"]


class DataError(Exception):
    """A dataset file is missing, truncated, corrupt, or does not match the official format.

    The message always names the offending file (or, when nothing could be obtained, lists
    every source that was tried and why it failed), so that a broken download never turns into a
    silently wrong dataset.
    """
