"""Latency: median of timed runs after warm-up, with the spread recorded.

The runner carries its own thread setting; this module only times it. One call is one
batch of the configured size, so the figure is per batch, as a deployment would see it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from objectives.base import Candidate, EvalContext, Objective, ObjectiveError, finite


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int

    @property
    def spread(self) -> float:
        """(p90 − p10) / median: how noisy this measurement was."""
        return (self.p90_ms - self.p10_ms) / self.median_ms


def time_runner(run: Callable[[np.ndarray], object], batch: np.ndarray, warmup: int, repeats: int) -> LatencyStats:
    for _ in range(warmup):
        run(batch)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        run(batch)
        times[i] = (time.perf_counter() - start) * 1000.0
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    if not median > 0:
        raise ObjectiveError(f"latency_ms: the timer measured {median} ms; the runner did no work")
    return LatencyStats(float(median), float(p10), float(p90), float(times.mean()), repeats)


def latency_batch(example_inputs, batch_size: int) -> np.ndarray:
    """A fixed random batch with the example's per-sample shape (contents do not change timing)."""
    shape = (batch_size, *tuple(example_inputs.shape[1:]))
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


class LatencyMs(Objective):
    name = "latency_ms"
    unit = "ms"
    direction = "minimize"

    def stats(self, candidate: Candidate, context: EvalContext) -> LatencyStats:
        settings = context.latency
        batch = latency_batch(context.example_inputs, settings.batch_size)
        return time_runner(candidate.run, batch, settings.warmup, settings.repeats)

    def evaluate(self, candidate: Candidate, context: EvalContext) -> float:
        return finite(self.name, self.stats(candidate, context).median_ms)

    def measure(self, candidate: Candidate, context: EvalContext) -> dict[str, float]:
        stats = self.stats(candidate, context)
        return {
            self.name: finite(self.name, stats.median_ms),
            "latency_p90_ms": stats.p90_ms,
            "latency_spread": stats.spread,
        }
