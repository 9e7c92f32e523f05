"""`comfy-proxy bench SCENARIO [--json]`: benchmarks on loopback that start what they need.

Output (PRODUCT.md): `{"scenario", "figures": {name: number}, "units": {name: unit}, "params": {...}}`.
Figures that compare with a baseline are ratios measured in the same run, interleaved where possible,
because these machines are noisy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from proxy.bench import admission, connections, fairness, jobs, outputs, overhead, scale, schedule, soak
from proxy.bench.result import BenchResult

__all__ = ["SCENARIOS", "BenchResult", "run_scenario"]

Scenario = Callable[[bool], Awaitable[BenchResult]]   # run(quick)

_RUNS: dict[str, Scenario] = {
    "overhead": overhead.run, "connections": connections.run, "admission": admission.run,
    "fairness": fairness.run, "schedule": schedule.run, "soak": soak.run, "outputs": outputs.run,
    "jobs": jobs.run, "scale": scale.run,
}
SCENARIOS = tuple(_RUNS)


async def run_scenario(name: str, quick: bool = False, minutes: float | None = None) -> BenchResult:
    """`minutes`: how long `soak` runs (the other scenarios have their own fixed length)."""
    run = _RUNS.get(name)
    if run is None:
        raise ValueError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    if name == "soak":
        return await soak.run(quick, minutes)
    if minutes is not None:
        raise ValueError("--minutes is for the soak scenario")
    return await run(quick)
