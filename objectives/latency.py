"""Latency: median of timed runs after warm-up, interleaved with the baseline's.

The runner carries its own thread setting; this module only times it. One call is one
batch, so the figure is per batch, as a deployment would see it. Timing the candidate and
the baseline in alternation within one loop makes `speedup` a same-run ratio: a slowdown of
the shared machine hits both sides of it alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from objectives.base import Candidate, EvalContext, Objective, ObjectiveError, finite

Runner = Callable[[np.ndarray], object]


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int

    @property
    def spread(self) -> float:
        """Half the p10–p90 width relative to the median: the ± of this measurement."""
        return (self.p90_ms - self.p10_ms) / (2 * self.median_ms)


def _stats(times_ms: np.ndarray) -> LatencyStats:
    p10, median, p90 = np.percentile(times_ms, [10, 50, 90])
    if not median > 0:
        raise ObjectiveError(f"latency_ms: the timer measured {median} ms; the runner did no work")
    return LatencyStats(float(median), float(p10), float(p90), float(times_ms.mean()), len(times_ms))


def time_interleaved(runs: Sequence[Runner], batch: np.ndarray, warmup: int, repeats: int) -> list[LatencyStats]:
    """Time several runners on one batch, alternating them call by call."""
    for run in runs:
        for _ in range(warmup):
            run(batch)
    times = np.empty((len(runs), repeats))
    for i in range(repeats):
        # Alternate who goes first, so neither side always runs on a cache the other warmed.
        order = range(len(runs)) if i % 2 == 0 else reversed(range(len(runs)))
        for j in order:
            start = time.perf_counter()
            runs[j](batch)
            times[j, i] = (time.perf_counter() - start) * 1000.0
    return [_stats(row) for row in times]


def time_runner(run: Runner, batch: np.ndarray, warmup: int, repeats: int) -> LatencyStats:
    return time_interleaved([run], batch, warmup, repeats)[0]


def latency_batch(example_inputs, batch_size: int) -> np.ndarray:
    """A fixed random batch with the example's per-sample shape (contents do not change timing)."""
    shape = (batch_size, *tuple(example_inputs.shape[1:]))
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


class LatencyMs(Objective):
    name = "latency_ms"
    unit = "ms"
    direction = "minimize"

    def evaluate(self, candidate: Candidate, context: EvalContext) -> float:
        return self.measure(candidate, context)[self.name]

    def measure(self, candidate: Candidate, context: EvalContext) -> dict[str, float]:
        """For each batch size: median, p90 and spread, and with a reference, the speedup.

        The first batch size reports under plain names (`latency_ms`); the others get a
        suffix (`latency_ms_b64`).
        """
        settings = context.latency
        metrics: dict[str, float] = {}
        for index, batch_size in enumerate(settings.batch_sizes):
            suffix = "" if index == 0 else f"_b{batch_size}"
            runs = [candidate.run] + ([context.reference_run] if context.reference_run else [])
            batch = latency_batch(context.example_inputs, batch_size)
            stats = time_interleaved(runs, batch, settings.warmup, settings.repeats)
            metrics[f"latency_ms{suffix}"] = finite(self.name, stats[0].median_ms)
            metrics[f"latency_p90_ms{suffix}"] = stats[0].p90_ms
            metrics[f"latency_spread{suffix}"] = stats[0].spread
            if context.reference_run:
                metrics[f"baseline_latency_ms{suffix}"] = stats[1].median_ms
                metrics[f"speedup{suffix}"] = stats[1].median_ms / stats[0].median_ms
        return metrics
