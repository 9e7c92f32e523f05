"""A one-minute smoke of `comfy-proxy bench soak` (the 30-minute run and its slopes are in the README): the
mixed load runs against two replicas and Redis without a failed request, and the sampling reads every
quantity the slopes are drawn from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests import tools


def test_a_one_minute_soak_carries_the_whole_load_without_a_failure() -> None:
    redis_dir = str(Path(tools.tool("redis-server")).parent)
    env = {**os.environ, "PATH": f"{redis_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "bench", "soak", "--minutes", "1", "--json"],
                          capture_output=True, text=True, timeout=240, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    figures = result["figures"]
    assert figures["failed"] == 0, figures
    assert figures["prompts_completed"] > 20 and figures["uploads"] > 10, figures
    assert figures["reads"] > 20 and figures["short_sockets"] > 10, figures
    assert figures["samples"] >= 20, figures
    series = result["params"]["series"]
    for replica in (1, 2):
        assert all(v > 0 for _, v in series[f"rss_mib_{replica}"]), series[f"rss_mib_{replica}"]
        assert all(v > 0 for _, v in series[f"tasks_{replica}"]), series[f"tasks_{replica}"]
        assert all(v > 0 for _, v in series[f"fds_{replica}"]), series[f"fds_{replica}"]
    assert all(v > 0 for _, v in series["redis_mib"])
