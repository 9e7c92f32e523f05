"""Processes of the conformance tier: real ComfyUI 0.3.75 servers (installed by setup_comfyui.sh into
.real-comfyui/) and a `comfy-proxy serve` in front of them, each on a free loopback port.

Every process is ours: started here, stopped here (SIGTERM, then SIGKILL after a deadline), its output
kept in a log file that a failed start quotes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
INSTALL = Path(os.environ.get("REAL_COMFYUI_DIR", REPO / ".real-comfyui"))
SETUP = "bash tests/real/setup_comfyui.sh"
START_TIMEOUT_S = 90.0   # ComfyUI answers after ~8 s alone, ~20 s with two starting on 2 busy cores


def unavailable_reason() -> str | None:
    """Why the tier cannot run here, or None when the installed ComfyUI is ready."""
    if (INSTALL / "READY").is_file() and (INSTALL / "venv" / "bin" / "python").is_file():
        return None
    why = INSTALL / "UNAVAILABLE"
    if why.is_file():
        return f"real ComfyUI unavailable: {why.read_text().strip()} (from `{SETUP}`)"
    return f"real ComfyUI is not installed: run `{SETUP}` (about two minutes; needs the CPU torch wheel on disk)"


@dataclass
class Process:
    """A child process with its log; `stop` ends it and waits."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, path: str, timeout: float = START_TIMEOUT_S) -> None:
        """Poll `path` until it answers 200 (no event exists for "the server is listening")."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer {path} in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)


def start_comfyui(name: str, base_dir: Path) -> Process:
    """One real ComfyUI on the CPU with its own base directory (so two of them write the same output
    names, as a real farm does). The torchvision stand-in is on this process's PYTHONPATH only."""
    for sub in ("custom_nodes", "models/checkpoints", "input", "output", "temp", "user"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = base_dir / "comfyui.log"
    env = {**os.environ, "PYTHONPATH": str(INSTALL / "standins"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(INSTALL / "venv" / "bin" / "python"), "main.py", "--cpu", "--listen", "127.0.0.1",
         "--port", str(port), "--base-directory", str(base_dir), "--database-url", "sqlite:///:memory:"],
        cwd=INSTALL / "ComfyUI", env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    return Process(name, f"http://127.0.0.1:{port}", proc, log)


def start_proxy(backends: list[Process], workdir: Path, redis_url: str | None) -> Process:
    """`comfy-proxy serve` as an operator runs it, from a config file naming the real backends."""
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "backends": [{"name": b.name, "url": b.url, "max_inflight": 2} for b in backends],
        "scheduler": {"poll_interval_s": 0.2},
        "uploads": {"dir": str(workdir / "uploads")},
    }
    if redis_url is not None:
        config["redis"] = {"url": redis_url}
        config["store"] = {"key_prefix": f"real-{port}"}
    path = workdir / "proxy.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    log = workdir / "proxy.log"
    exe = Path(sys.executable).with_name("comfy-proxy")
    proc = subprocess.Popen([str(exe), "--log-level", "warning", "serve", "--config", str(path)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Process("proxy", f"http://127.0.0.1:{port}", proc, log)
