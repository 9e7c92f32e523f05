"""What a benchmark scenario reports: figures with their units and the parameters they were measured under.

A leaf module, so the package's scenario table and every scenario can import it.
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
