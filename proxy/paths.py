"""Names that clients choose (`/view`, `/extensions/...`, uploads) and the file system refuses."""

from __future__ import annotations

import errno
from pathlib import Path

# Errors that mean "no such name can exist here", not a broken disk: a name too long, one the file system
# cannot encode. A NUL byte raises ValueError before any system call. Found by the fuzzer as 500s.
UNUSABLE_NAME = frozenset({errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ})


def unusable_name(exc: Exception) -> bool:
    """`exc` says the name itself is impossible (answer 400 or 404), not that the disk failed (500)."""
    return isinstance(exc, ValueError) or (isinstance(exc, OSError) and exc.errno in UNUSABLE_NAME)


def is_file(path: Path) -> bool:
    """`Path.is_file`, false for a name the file system refuses: pathlib raises ENAMETOOLONG (and a NUL
    byte's ValueError) where `os.path.isfile` would answer False."""
    try:
        return path.is_file()
    except (OSError, ValueError) as exc:
        if not unusable_name(exc):
            raise
        return False
