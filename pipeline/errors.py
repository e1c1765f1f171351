"""User-facing errors.

Anything the user must act on (a missing file, a bad manifest, a mismatched checkpoint) is raised as
:class:`SamcpError` with a one-line message that names the problem and the fix. The CLI prints it
without a traceback and exits non-zero.
"""

from __future__ import annotations


class SamcpError(Exception):
    """An error caused by the user's input, with a one-line message saying what to do."""
