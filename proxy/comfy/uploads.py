"""ComfyUI's upload naming (server.py `image_upload`): where an uploaded file goes and under which name.

Without `overwrite`, an existing name with different bytes becomes `name (1).png`, `name (2).png`, …;
identical bytes keep the existing name and nothing is written. A subfolder or name escaping the folder
is refused. Used by the simulator's `/upload/image` and by the proxy's own upload store.
"""

from __future__ import annotations

import hashlib
import os


def same_bytes(path: str, data: bytes) -> bool:
    """ComfyUI's duplicate check for uploads: identical content keeps the existing name."""
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()


def upload_target(upload_dir: str, subfolder: str, filename: str, data: bytes, overwrite: bool
                  ) -> tuple[str, str, bool] | None:
    """(final name, its path, whether to write) for an upload, or None for a path escape."""
    upload_dir = os.path.abspath(upload_dir)
    folder = os.path.join(upload_dir, os.path.normpath(subfolder))
    path = os.path.abspath(os.path.join(folder, filename))
    if os.path.commonpath((upload_dir, path)) != upload_dir:
        return None
    os.makedirs(folder, exist_ok=True)
    if overwrite:
        return filename, path, True
    stem, ext = os.path.splitext(filename)
    i = 1
    while os.path.exists(path):
        if same_bytes(path, data):
            return filename, path, False
        filename = f"{stem} ({i}){ext}"
        path = os.path.join(folder, filename)
        i += 1
    return filename, path, True
