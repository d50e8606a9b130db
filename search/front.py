"""The front in the baseline's units: feasibility, hypervolume, and which model to ship.

Every objective turns itself into a baseline-relative quantity to minimise (`Objective.relative`:
accuracy into the accuracy drop, size and latency into ratios to the baseline's). The
hypervolume is measured against each objective's fixed reference value in those units, so it
is comparable across the trials of a study, across studies of one workload, and against an
exhaustively evaluated table.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from optuna._hypervolume import compute_hypervolume  # pinned with optuna (<6)

from objectives.registry import get_objective, objective_of_limit


def relative(values: Mapping[str, float], baseline: Mapping[str, float], objectives: Sequence[str]) -> np.ndarray:
    """The objectives of one point as baseline-relative quantities to minimise."""
    return np.asarray([get_objective(name)().relative(values, baseline) for name in objectives], dtype=float)


def reference_point(objectives: Sequence[str]) -> dict[str, float]:
    """Each objective's reference value: a point counts toward the hypervolume only if it is
    better than all of them (by default: at most 10 points less accurate, smaller than the
    baseline, and at most 1.5x its latency)."""
    return {name: get_objective(name).reference for name in objectives}


def hypervolume(
    points: Sequence[Mapping[str, float]],
    baseline: Mapping[str, float],
    objectives: Sequence[str],
    reference: Sequence[float] | None = None,
) -> float:
    """Hypervolume of `points` (dicts holding every objective) against the objectives'
    reference point, or `reference`."""
    reference = np.asarray(list(reference_point(objectives).values()) if reference is None else reference, dtype=float)
    if not points:
        return 0.0
    values = np.stack([relative(p, baseline, objectives) for p in points])
    values = values[np.all(values < reference, axis=1)]
    if len(values) == 0:
        return 0.0
    return float(compute_hypervolume(values, reference))


def violation(constraints: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """How far a trial is from feasible, in baseline units (0 when feasible)."""
    return sum(v / objective_of_limit(key)().unit_of_limit(baseline) for key, v in constraints.items() if v > 0) + 0.0


def knee(rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, float], objectives: Sequence[str]) -> Mapping:
    """The point closest to the ideal one, with each objective scaled to [0, 1] over `rows`."""
    values = np.stack([relative(r, baseline, objectives) for r in rows])
    span = values.max(axis=0) - values.min(axis=0)
    scaled = (values - values.min(axis=0)) / np.where(span > 0, span, 1.0)
    return rows[int(np.argmin(np.linalg.norm(scaled, axis=1)))]


def floor(baseline: Mapping[str, float], metric: str = "accuracy") -> float | None:
    """The lowest figure a sensible model reaches: halfway from a model that ignores its input
    (the majority class) to the baseline. Trials below it are shown but never decide the pick."""
    trivial = baseline.get(f"trivial_{metric}")
    return None if trivial is None else (trivial + baseline[metric]) / 2


def sensible(rows: Sequence[Mapping[str, Any]], baseline: Mapping[str, float], metric: str = "accuracy") -> list:
    low = floor(baseline, metric)
    return [r for r in rows if low is None or r[metric] >= low]


def alternatives(
    front: Sequence[Mapping[str, Any]], baseline: Mapping[str, float], metric: str = "accuracy", within: float = 0.01
) -> dict[str, Mapping[str, Any]]:
    """What users most often want besides the pick: the smallest and the fastest Pareto model
    within `within` (1 point) of the baseline on validation."""
    near = [r for r in front if baseline[metric] - r[metric] <= within + 1e-12]
    found = {}
    for label, key in (("smallest", "size_bytes"), ("fastest", "latency_ms")):
        if near and all(key in r for r in near):
            found[f"{label} within {100 * within:g} pt"] = min(near, key=lambda r, k=key: (r[k], -r[metric]))
    return found


def recommend(
    front: Sequence[Mapping[str, Any]],
    baseline: Mapping[str, float],
    objectives: Sequence[str],
    max_accuracy_drop: float | None,
    metric: str = "accuracy",
) -> tuple[Mapping[str, Any] | None, str]:
    """The configuration to ship among the (feasible) Pareto rows, and the rule that chose it.

    With an accuracy limit: the smallest model whose validation drop is within it. Without
    one, or when no model is within it: the knee of the sensible front (above `floor`).
    """
    if not front:
        return None, "no Pareto-optimal trial to recommend"
    if max_accuracy_drop is not None and "size_bytes" in front[0]:
        within = [r for r in front if baseline[metric] - r[metric] <= max_accuracy_drop + 1e-12]
        if within:
            best = min(within, key=lambda r: (r["size_bytes"], -r[metric]))
            return best, (
                f"the smallest model within the {metric} limit (validation drop <= {100 * max_accuracy_drop:.2f} pt)"
            )
    candidates = sensible(front, baseline, metric) or list(front)
    return knee(candidates, baseline, objectives), (
        "the knee of the front: the point closest to the ideal one, each objective scaled to [0, 1] over the "
        "front's sensible models"
    )
