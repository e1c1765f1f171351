"""User-facing errors.

Anything the user must act on (a missing file, a bad manifest, a mismatched checkpoint) is raised as
:class:`SamcpError` with a one-line message that names the problem and the fix. The CLI prints it
without a traceback and exits non-zero.

:func:`expected_error_message` is the one place that also turns the *expected* failures of a
command-line tool's environment into such lines: operating-system errors on the user's paths (a
missing file, a folder given for a file, no permission, a full disk) and malformed input files
(JSON, YAML, safetensors). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys


class SamcpError(Exception):
    """An error caused by the user's input, with a one-line message saying what to do."""


_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EISDIR: "pass a file, not a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EACCES: "check the permissions, or choose another location",
    errno.EPERM: "check the permissions, or choose another location",
    errno.ENOSPC: "free some space or choose another location, then re-run (runs resume)",
    errno.EROFS: "choose a writable location",
    errno.EEXIST: "choose another path",
}


def expected_error_message(exc: BaseException) -> str | None:
    """A one-line message for an error the user can fix, or None for a bug.

    Args:
        exc: the exception that ended a command.
    """
    if isinstance(exc, SamcpError):
        return _one_line(str(exc))
    if isinstance(exc, OSError) and exc.errno in _OS_FIXES:
        names = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        what = exc.strerror or str(exc)
        return _one_line(f"{names + ': ' if names else ''}{what}; {_OS_FIXES[exc.errno]}")
    if isinstance(exc, UnicodeDecodeError):
        return _one_line(
            f"an input file is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8 and re-run"
        )
    for module, cls, what in _FORMAT_ERRORS:
        mod = sys.modules.get(module)  # only formats whose library is in use can have failed
        err = getattr(mod, cls, None) if mod is not None else None
        if isinstance(err, type) and isinstance(exc, err):
            return _one_line(f"{what} ({exc}); check or re-create that file")
    return None


# (module, exception class, what went wrong): malformed input files.
_FORMAT_ERRORS = (
    ("json", "JSONDecodeError", "a JSON input file is malformed"),
    ("yaml", "YAMLError", "a YAML input file is malformed"),
    ("safetensors", "SafetensorError", "a .safetensors file is truncated or not safetensors"),
)


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
