"""File checks on names that clients choose (`/view`, `/extensions/...`, uploads)."""

from __future__ import annotations

from pathlib import Path


def is_file(path: Path) -> bool:
    """`Path.is_file`, false for names the OS refuses. pathlib raises on a name too long for the file
    system (ENAMETOOLONG) and on a NUL byte (ValueError), where a client's name must just not be found."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False
