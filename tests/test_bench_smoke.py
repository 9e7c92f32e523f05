"""Short runs of `comfy-proxy bench outputs` and `bench jobs` (their figures are in the README): each
runs to the end and reports what it measures. No figure is held to a goal here (a timed test would be
noise on a busy machine); the goals are checked by running the benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def bench(scenario: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "proxy.cli", "bench", scenario, "--quick", "--json"],
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["scenario"] == scenario and set(result["figures"]) == set(result["units"])
    return result


def test_bench_outputs_measures_the_copy_and_the_view_from_the_store() -> None:
    result = bench("outputs")
    figures = result["figures"]
    assert {"copy_added_ms_p50", "copy_added_ms_p99", "view_throughput_ratio_dir"} <= set(figures)
    assert figures["view_mb_per_s_dir"] > 0 and figures["view_mb_per_s_backend"] > 0
    assert result["params"]["view_bytes"] > 1_000_000   # the ~1 MiB PNG the goal is about


def test_bench_jobs_holds_every_stream_it_opens_and_times_webhooks() -> None:
    result = bench("jobs")
    figures = result["figures"]
    assert figures["sse_streams_held"] == result["params"]["target"] == 2000
    assert "first_error" not in result["params"]
    assert figures["kib_per_sse_stream"] > 0
    for store in ("", "_redis"):   # every delivery came (else the run fails), each after its prompt's end
        assert 0 < figures[f"webhook_latency_ms_p50{store}"] <= figures[f"webhook_latency_ms_p99{store}"]
