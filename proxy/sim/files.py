"""The simulator's folders and ComfyUI's file rules (folder_paths.py, server.py `image_upload`).

Paths and their escape checks are ComfyUI's own: `commonpath` against the folder, `[output]`-style
annotations, and the `{prefix}_{counter:05}_.png` numbering that continues from the highest existing file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class SimPaths:
    base: str
    input: str
    output: str
    temp: str
    user: str
    owned: bool  # a temp dir made for this simulator, removed on close

    @classmethod
    def create(cls, base_dir: str | None) -> SimPaths:
        owned = base_dir is None
        base = os.path.realpath(tempfile.mkdtemp(prefix="comfy-sim-") if base_dir is None else base_dir)
        paths = cls(base=base, input=os.path.join(base, "input"), output=os.path.join(base, "output"),
                    temp=os.path.join(base, "temp"), user=os.path.join(base, "user"), owned=owned)
        shutil.rmtree(paths.temp, ignore_errors=True)  # ComfyUI empties temp/ at start
        for folder in (paths.input, paths.output, paths.temp, paths.user):
            os.makedirs(folder, exist_ok=True)
        return paths

    def remove(self) -> None:
        if self.owned:
            shutil.rmtree(self.base, ignore_errors=True)

    def by_type(self, type_name: str | None) -> str | None:
        return {"output": self.output, "temp": self.temp, "input": self.input}.get(type_name or "")

    def annotated(self, name: str) -> tuple[str, str | None]:
        """`name.png [output]` -> ("name.png", output dir); no annotation -> (name, None)."""
        for suffix, folder in (("[output]", self.output), ("[input]", self.input), ("[temp]", self.temp)):
            if name.endswith(suffix):
                return name[:-len(suffix) - 1], folder
        return name, None

    def annotated_input_path(self, name: str) -> str:
        filename, folder = self.annotated(name)
        return os.path.join(folder or self.input, filename)


def _compute_vars(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    for key, value in (("%width%", str(width)), ("%height%", str(height)), ("%year%", str(now.tm_year)),
                       ("%month%", f"{now.tm_mon:02}"), ("%day%", f"{now.tm_mday:02}"),
                       ("%hour%", f"{now.tm_hour:02}"), ("%minute%", f"{now.tm_min:02}"),
                       ("%second%", f"{now.tm_sec:02}")):
        prefix = prefix.replace(key, value)
    return prefix


def get_save_image_path(filename_prefix: str, output_dir: str, width: int = 0, height: int = 0
                        ) -> tuple[str, str, int, str]:
    """(full folder, file name stem, next counter, subfolder), folder_paths.get_save_image_path."""
    if "%" in filename_prefix:
        filename_prefix = _compute_vars(filename_prefix, width, height)
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    common = os.path.commonpath((output_dir, os.path.abspath(full_output_folder)))
    if common != output_dir:
        # ComfyUI raises a bare Exception here: exception_type "Exception" (traces/run_error.json)
        raise Exception(
            "**** ERROR: Saving image outside the output folder is not allowed."
            f"\n full_output_folder: {os.path.abspath(full_output_folder)}"
            f"\n         output_dir: {output_dir}"
            f"\n         commonpath: {common}")
    try:
        highest = _listing(full_output_folder).highest(filename)
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
        highest = None
    counter = 1 if highest is None else highest + 1
    return full_output_folder, filename, counter, subfolder


class _Listing:
    """What a save folder holds, as far as the next counter goes. ComfyUI lists the folder and parses
    every name on each save, which grows with the files a long run leaves in temp/ (and PreviewImage picks
    a new random prefix per node object); the simulator indexes every name once by each prefix it could
    answer for, updates the index as it writes, and lists the folder again only when something else
    changed it (its mtime moved)."""

    def __init__(self, folder: str) -> None:
        self.mtime = os.stat(folder).st_mtime_ns
        self._highest: dict[str, int] = {}   # normcase(prefix) → highest counter among its files
        self._lock = threading.Lock()          # big images are written from worker threads
        for name in os.listdir(folder):
            self._index(name)

    def highest(self, filename: str) -> int | None:
        return self._highest.get(os.path.normcase(filename))

    def add(self, name: str, mtime: int) -> None:
        with self._lock:
            self._index(name)
            self.mtime = mtime

    def _index(self, name: str) -> None:
        """`name` answers for every prefix that ends before one of its underscores (`_counter_of`)."""
        at = name.find("_")
        while at >= 0:
            prefix = os.path.normcase(name[:at])
            counter = _counter_of(name, name[:at]) or 0
            if counter >= self._highest.get(prefix, -1):
                self._highest[prefix] = counter
            at = name.find("_", at + 1)


_listings: dict[str, _Listing] = {}


def _listing(folder: str) -> _Listing:
    folder = os.path.normpath(folder)   # os.path.join(output, "") ends in a slash; note_written's does not
    mtime = os.stat(folder).st_mtime_ns
    cached = _listings.get(folder)
    if cached is not None and cached.mtime == mtime:
        return cached
    listing = _listings[folder] = _Listing(folder)
    return listing


def note_written(path: str) -> None:
    """The simulator wrote `path`: keep its folder's listing current without listing it again."""
    folder, name = os.path.split(path)
    cached = _listings.get(os.path.normpath(folder))
    if cached is not None:
        cached.add(name, os.stat(folder).st_mtime_ns)


def _counter_of(existing: str, filename: str) -> int | None:
    """The counter of `{filename}_{counter}_...`, or None when the file has another prefix."""
    prefix_len = len(filename)
    prefix = existing[:prefix_len + 1]
    if os.path.normcase(prefix[:-1]) != os.path.normcase(filename) or prefix[-1:] != "_":
        return None
    try:
        return int(existing[prefix_len + 1:].split("_")[0])
    except ValueError:
        return 0


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
