"""The one list of objectives: config validation, the baseline, the front and the report read it.

A new objective is its own module plus `register_objective(MyObjective)`.
"""

from __future__ import annotations

from objectives.accuracy import Accuracy
from objectives.base import Objective
from objectives.latency import LatencyMs
from objectives.size import SizeBytes
from objectives.task import EmbeddingFidelity, MacroF1

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Accuracy, MacroF1, EmbeddingFidelity, SizeBytes, LatencyMs)
}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Add an objective (usable as a class decorator). Its name and limit metric must be new."""
    if cls.name in OBJECTIVES:
        raise ValueError(f"an objective named {cls.name!r} is registered already")
    if cls.direction not in ("maximize", "minimize"):
        raise ValueError(f"{cls.__name__}.direction must be 'maximize' or 'minimize', got {cls.direction!r}")
    if any(other.limit() == cls.limit() for other in OBJECTIVES.values()):
        raise ValueError(f"{cls.__name__}: another objective's limit applies to {cls.limit()!r} already")
    OBJECTIVES[cls.name] = cls
    return cls


def unregister_objective(cls: type[Objective]) -> None:
    if OBJECTIVES.get(cls.name) is cls:
        del OBJECTIVES[cls.name]


def task_metrics() -> list[str]:
    """The names a workload may score by (`workload.metric`)."""
    return sorted(name for name, cls in OBJECTIVES.items() if cls.task_metric)


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid names are {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_of_limit(metric: str) -> type[Objective]:
    """The objective that a limit on `metric` (``accuracy_drop``, ``size_bytes``) belongs to."""
    for cls in OBJECTIVES.values():
        if cls.limit() == metric:
            return cls
    limits = sorted(cls.limit() for cls in OBJECTIVES.values())
    raise ValueError(f"no objective takes a limit on {metric!r}; limits apply to {limits}")
