"""User-facing errors.

Every problem caused by a user's input (a bad path, an unsupported model, a group size that does not
divide a layer, too little calibration text, a NaN loss) is raised as `GSQError` with a one-line
message naming the problem. The CLI prints that line and exits with status 2.
"""

from __future__ import annotations


class GSQError(Exception):
    """A clear, one-line error about the user's input or a failed run."""
