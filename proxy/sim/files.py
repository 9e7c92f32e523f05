"""The simulator's folders and ComfyUI's file rules (folder_paths.py, server.py `image_upload`).

Paths and their escape checks are ComfyUI's own: `commonpath` against the folder, `[output]`-style
annotations, and the `{prefix}_{counter:05}_.png` numbering that continues from the highest existing file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
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
        counters = [_counter_of(f, filename) for f in _names_in(full_output_folder) if f.startswith(filename)]
        counter = max(c for c in counters if c is not None) + 1
    except ValueError:
        counter = 1
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
        counter = 1
    return full_output_folder, filename, counter, subfolder


# folder -> (its mtime when listed, its names): ComfyUI lists the folder on every save, which grows with the
# files a long run leaves in temp/; the simulator lists it again only when something else changed it.
_listings: dict[str, tuple[int, set[str]]] = {}


def _names_in(folder: str) -> set[str]:
    mtime = os.stat(folder).st_mtime_ns
    cached = _listings.get(folder)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    names = set(os.listdir(folder))
    _listings[folder] = (mtime, names)
    return names


def note_written(path: str) -> None:
    """The simulator wrote `path`: keep its folder's cached listing current without listing it again."""
    folder, name = os.path.split(path)
    cached = _listings.get(folder)
    if cached is not None:   # a new set: a reader on the event loop may be iterating the old one
        _listings[folder] = (os.stat(folder).st_mtime_ns, cached[1] | {name})


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
