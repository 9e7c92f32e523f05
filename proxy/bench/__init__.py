"""`comfy-proxy bench SCENARIO [--json]`: benchmarks on loopback that start what they need.

Output (PRODUCT.md): `{"scenario", "figures": {name: number}, "units": {name: unit}, "params": {...}}`.
Figures that compare with a baseline are ratios measured in the same run, interleaved where possible,
because these machines are noisy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BenchResult:
    scenario: str
    figures: dict[str, float] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: float, unit: str) -> None:
        self.figures[name] = round(value, 4)
        self.units[name] = unit

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "figures": self.figures, "units": self.units, "params": self.params}


SCENARIOS = ("overhead", "connections", "admission", "fairness", "schedule")


async def run_scenario(name: str, quick: bool = False) -> BenchResult:
    if name == "overhead":
        from proxy.bench.overhead import run
    elif name == "connections":
        from proxy.bench.connections import run
    elif name == "admission":
        from proxy.bench.admission import run
    elif name == "fairness":
        from proxy.bench.fairness import run
    elif name == "schedule":
        from proxy.bench.schedule import run
    else:
        raise ValueError(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    return await run(quick)
