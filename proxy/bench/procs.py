"""Processes a benchmark starts on loopback: simulators, proxies and a private redis-server, each its
own process so the load generator does not share their CPU time slices or event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> int:
    """Benchmarks with thousands of sockets need descriptors; raise the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    url: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used (so a figure can say what a prompt costs)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def wait_http(url: str, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{url} did not answer 200")
            await asyncio.sleep(0.05)


def spawn(args: list[str], stdout: IO[bytes] | None = None, **env_vars: str) -> subprocess.Popen[bytes]:
    """`comfy-proxy ARGS` as a process of its own, quiet (its output into `stdout` if given), with the
    descriptor limit raised."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env_vars}
    return subprocess.Popen([sys.executable, "-m", "proxy.cli", "--log-level", "warning", *args],
                            stdout=stdout or subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            preexec_fn=raise_fd_limit)


@contextlib.asynccontextmanager
async def sim(name: str, *extra: str) -> AsyncIterator[Proc]:
    port = free_port()
    proc = Proc(spawn(["sim", "--name", name, "--port", str(port), *extra]), f"http://127.0.0.1:{port}")
    try:
        await wait_http(proc.url + "/system_stats")
        yield proc
    finally:
        proc.stop()


@contextlib.asynccontextmanager
async def proxy(backends: list[str], *extra: str, config: str | None = None, ready_s: float = 20.0
                ) -> AsyncIterator[Proc]:
    port = free_port()
    args = ["serve", "--port", str(port)]
    for url in backends:
        args += ["--backend", url]
    if config:
        args += ["--config", config]
    # outputs.store dir's default folder: the run's own, not the user's data folder
    with tempfile.TemporaryDirectory(prefix="comfy-proxy-bench-") as data:
        proc = Proc(spawn([*args, *extra], XDG_DATA_HOME=data), f"http://127.0.0.1:{port}")
        try:
            await wait_http(proc.url + "/proxy/readyz", ready_s)
            yield proc
        finally:
            proc.stop()


def _start_redis(binary: str, port: int, workdir: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.asynccontextmanager
async def redis_server() -> AsyncIterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        process = _start_redis(binary, port, workdir)
        try:
            for _ in range(200):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                    break
                await asyncio.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)
