"""Backend health beyond the poll: a circuit breaker per backend, and outlier ejection over the farm.

The poll (`proxy.backends`) says whether a backend answers `/system_stats` right now, and the upstream
socket whether its events can reach us. Neither catches a backend that answers the poll but fails the
requests that matter, or one that keeps failing the prompts it runs. Two mechanisms do, both in the
same `available` decision of the farm (`BackendState.available`):

Circuit breaker (per backend, fed by real requests: dispatch, `/view`, control calls):
  closed     — used; consecutive failed requests are counted, a request that works resets the count.
  open       — after `failure_threshold` consecutive failures: not used for `open_s`, doubled on each
               re-open, up to `open_max_s`; the poll keeps running but its successes are not trusted yet.
  half_open  — the wait is over: the next poll is the probe. It succeeds → closed; it fails (or a
               request fails) → open again with the doubled wait. The doubling starts again from
               `open_s` once the breaker has stayed closed for `open_max_s`.
  A failed poll alone does not count: it already takes the backend out until the next good poll, and
  counting it would make every reboot wait out a grown backoff after the backend is back.

Outlier ejection (over the farm, fed by how prompts end):
  a backend whose last `outlier_errors` prompts all ended in `execution_error`, while another backend
  finished a prompt successfully after this one's last success, is ejected for `ejection_s`, doubled on each
  ejection up to `ejection_max_s` (reset after `ejection_max_s` without one). At most
  `max_ejected_fraction` of the farm (rounded down) is ejected at once, so a bad workflow that fails
  everywhere cannot empty the farm, and a one-backend farm is never ejected.

Times are `time.monotonic()` seconds passed in by the caller, so every transition is a pure function of
the calls made (unit-tested in tests/test_health.py). State is per replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from proxy.config import HealthConfig

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
CIRCUIT_STATES = (CLOSED, OPEN, HALF_OPEN)


@dataclass
class Backoff:
    """Exponential waits: base, 2×base, 4×base, … up to cap."""

    base: float
    cap: float
    level: int = 0

    def next(self) -> float:
        wait = min(self.base * 2 ** self.level, self.cap)
        if wait < self.cap:
            self.level += 1
        return wait

    def reset(self) -> None:
        self.level = 0


@dataclass
class CircuitBreaker:
    threshold: int
    backoff: Backoff
    state: str = CLOSED
    failures: int = 0                 # consecutive failed requests while closed
    retry_at: float = 0.0             # when an open breaker becomes half-open
    closed_since: float = -math.inf   # when it last closed (the backoff starts small after a quiet cap)

    def current(self, now: float) -> str:
        if self.state == OPEN and now >= self.retry_at:
            self.state = HALF_OPEN
        return self.state

    @property
    def allows(self) -> bool:
        """Whether new prompts may go there (call `current` first so an elapsed wait is seen)."""
        return self.state == CLOSED

    def failure(self, now: float) -> None:
        """A real request failed (connection error, timeout, 5xx)."""
        state = self.current(now)
        if state == HALF_OPEN:
            self._open(now)
        elif state == CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open(now)

    def success(self, now: float) -> None:
        """A real request worked: the failures were not consecutive."""
        if self.current(now) == CLOSED:
            self.failures = 0

    def probe(self, ok: bool, now: float) -> None:
        """The active check's result; it decides only while half-open."""
        if self.current(now) != HALF_OPEN:
            return
        if ok:
            self.state, self.failures, self.closed_since = CLOSED, 0, now
        else:
            self._open(now)

    def _open(self, now: float) -> None:
        if self.state == CLOSED and now - self.closed_since >= self.backoff.cap:
            self.backoff.reset()
        self.state = OPEN
        self.retry_at = now + self.backoff.next()


@dataclass
class _Record:
    backoff: Backoff
    errors: int = 0                   # consecutive prompts that ended in execution_error
    last_success: float = -math.inf
    ejected_until: float = -math.inf


@dataclass
class OutlierDetector:
    """Which backends are ejected; `outcome` is told how every prompt on each backend ended."""

    config: HealthConfig
    _records: dict[str, _Record] = field(default_factory=dict)

    def add(self, name: str) -> None:
        self._records.setdefault(name, _Record(Backoff(self.config.ejection_s, self.config.ejection_max_s)))

    def remove(self, name: str) -> None:
        self._records.pop(name, None)

    def ejected_until(self, name: str, now: float) -> float | None:
        rec = self._records.get(name)
        return rec.ejected_until if rec is not None and now < rec.ejected_until else None

    def ejected_count(self, now: float) -> int:
        return sum(1 for rec in self._records.values() if now < rec.ejected_until)

    def max_ejected(self) -> int:
        return math.floor(self.config.max_ejected_fraction * len(self._records) + 1e-9)

    def outcome(self, name: str, outcome: str, now: float) -> bool:
        """Record a prompt's end (success, error, interrupted); True when this ejects the backend."""
        rec = self._records.get(name)
        if rec is None:
            return False
        if outcome == "success":
            rec.errors, rec.last_success = 0, now
            return False
        if outcome != "error" or self.config.outlier_errors == 0 or now < rec.ejected_until:
            return False  # interruptions say nothing; errors of prompts already there while ejected neither
        rec.errors += 1
        if rec.errors < self.config.outlier_errors:
            return False
        others_succeed = any(other.last_success > rec.last_success
                             for other_name, other in self._records.items() if other_name != name)
        if not others_succeed or self.ejected_count(now) + 1 > self.max_ejected():
            return False
        if now - rec.ejected_until >= self.config.ejection_max_s:
            rec.backoff.reset()
        rec.ejected_until = now + rec.backoff.next()
        rec.errors = 0
        return True


@dataclass(frozen=True)
class HealthView:
    """What a backend snapshot carries of its health (immutable, compared on every change)."""

    circuit: str = CLOSED
    failures: int = 0
    retry_at: float = 0.0            # monotonic time an open circuit turns half-open
    ejected_until: float | None = None

    @property
    def allows(self) -> bool:
        return self.circuit == CLOSED and self.ejected_until is None

    def describe(self, now: float) -> dict[str, object]:
        return {
            "circuit": self.circuit,
            "consecutive_failures": self.failures,
            "circuit_retry_in_s": round(max(self.retry_at - now, 0.0), 3) if self.circuit == OPEN else None,
            "ejected": self.ejected_until is not None,
            "ejected_for_s": round(max(self.ejected_until - now, 0.0), 3) if self.ejected_until else None,
        }


class FarmHealth:
    """Breakers and ejections of every backend, read by the farm as `HealthView`s."""

    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self._breakers: dict[str, CircuitBreaker] = {}
        self.outliers = OutlierDetector(config)

    def add(self, name: str) -> None:
        if name not in self._breakers:
            self._breakers[name] = CircuitBreaker(self.config.failure_threshold,
                                                  Backoff(self.config.open_s, self.config.open_max_s))
        self.outliers.add(name)

    def remove(self, name: str) -> None:
        self._breakers.pop(name, None)
        self.outliers.remove(name)

    def breaker(self, name: str) -> CircuitBreaker | None:
        return self._breakers.get(name)

    def view(self, name: str, now: float) -> HealthView:
        breaker = self._breakers.get(name)
        if breaker is None:
            return HealthView()
        return HealthView(breaker.current(now), breaker.failures, breaker.retry_at,
                          self.outliers.ejected_until(name, now))
