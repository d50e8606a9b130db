"""Latency: median of timed runs after warm-up, interleaved with the baseline's.

The runner carries its own thread setting; this module only times it. One call is one
batch, so the figure is per batch, as a deployment would see it. Timing the candidate and
the baseline in alternation within one loop makes `speedup` a same-run ratio: a slowdown of
the shared machine hits both sides of it alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from objectives.base import Batch, Candidate, EvalContext, Objective, ObjectiveError, finite

Runner = Callable[[Batch], object]


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int

    @property
    def spread(self) -> float:
        """Half the p10–p90 width relative to the median: the ± of this measurement."""
        return (self.p90_ms - self.p10_ms) / (2 * self.median_ms)


def _stats(times_ms: np.ndarray) -> LatencyStats:
    p10, median, p90 = np.percentile(times_ms, [10, 50, 90])
    if not median > 0:
        raise ObjectiveError(f"latency_ms: the timer measured {median} ms; the runner did no work")
    return LatencyStats(float(median), float(p10), float(p90), len(times_ms))


def time_interleaved(runs: Sequence[Runner], batch: Batch, warmup: int, repeats: int) -> list[LatencyStats]:
    """Time several runners on one batch, alternating them call by call."""
    for run in runs:
        for _ in range(warmup):
            run(batch)
    times = np.empty((len(runs), repeats))
    order_rng = np.random.default_rng(0)
    for i in range(repeats):
        # A fresh order every round, so no runner always takes the same place or always runs
        # on a cache the same other one warmed (a fixed order favoured the last by ~2 %).
        for j in order_rng.permutation(len(runs)):
            start = time.perf_counter()
            runs[j](batch)
            times[j, i] = (time.perf_counter() - start) * 1000.0
    return [_stats(row) for row in times]


def latency_batch(example_inputs, batch_size: int, sequence_length: int | None = None) -> Batch:
    """A fixed batch of `batch_size` samples shaped like the example: random values for one float
    tensor (contents do not change timing); for named inputs, the example repeated (random token
    ids or masks would not be valid inputs), cut or zero-padded to `sequence_length` tokens."""
    if hasattr(example_inputs, "keys"):
        rows = example_inputs[[0] * batch_size].numpy()
        return {name: _to_length(array, sequence_length) for name, array in rows.items()}
    shape = (batch_size, *tuple(example_inputs.shape[1:]))
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _to_length(array: np.ndarray, length: int | None) -> np.ndarray:
    if length is None or array.ndim < 2 or array.shape[1] == length:
        return array
    if array.shape[1] > length:
        return np.ascontiguousarray(array[:, :length])
    padding = [(0, 0), (0, length - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, padding)


def metric_suffix(index: int, batch_size: int) -> str:
    """The first batch size reports under plain names (``latency_ms``), the others with a
    suffix (``latency_ms_b64``)."""
    return "" if index == 0 else f"_b{batch_size}"


class LatencyMs(Objective):
    name = "latency_ms"
    unit = "ms"
    direction = "minimize"
    reference = 1.5  # at most 1.5x the baseline's latency
    final_repeat = True

    def evaluate(self, candidate: Candidate, context: EvalContext) -> float:
        return self._time(candidate, context, context.latency.batch_size)[0].median_ms

    def measure(self, candidate: Candidate, context: EvalContext) -> dict[str, float]:
        """For each batch size: median, p90 and spread, and with a reference, the speedup."""
        metrics: dict[str, float] = {}
        for index, batch_size in enumerate(context.latency.batch_sizes):
            suffix = metric_suffix(index, batch_size)
            stats = self._time(candidate, context, batch_size)
            metrics[f"latency_ms{suffix}"] = stats[0].median_ms
            metrics[f"latency_p90_ms{suffix}"] = stats[0].p90_ms
            metrics[f"latency_spread{suffix}"] = stats[0].spread
            if context.reference_run:
                metrics[f"baseline_latency_ms{suffix}"] = stats[1].median_ms
                metrics[f"speedup{suffix}"] = stats[1].median_ms / stats[0].median_ms
        return metrics

    def relative(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> float:
        """The inverse of the trial's own `speedup` where it has one: that ratio was timed in
        alternation with the baseline in the same process, while `baseline["latency_ms"]` is
        from whichever process computes this (a resumed study's, on a machine now busier or idler)."""
        if metrics.get("speedup"):
            return 1.0 / metrics["speedup"]
        return metrics[self.name] / baseline[self.name]

    def _time(self, candidate: Candidate, context: EvalContext, batch_size: int) -> list[LatencyStats]:
        """The candidate, and the baseline's runner if the context has one, timed in alternation."""
        settings = context.latency
        runs = [candidate.run] + ([context.reference_run] if context.reference_run else [])
        batch = latency_batch(context.example_inputs, batch_size, settings.sequence_length)
        stats = time_interleaved(runs, batch, settings.warmup, settings.repeats)
        finite(self.name, stats[0].median_ms)
        return stats
