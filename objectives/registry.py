"""Objective lookup by name."""

from objectives.accuracy import Accuracy
from objectives.base import Objective
from objectives.latency import LatencyMs
from objectives.size import SizeBytes

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Accuracy, SizeBytes, LatencyMs)}


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"search.objectives: unknown objective {name!r}; valid names are {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]
