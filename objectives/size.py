"""Size: the byte length of the artifact file actually written, not parameters × bits."""

from __future__ import annotations

import os
from typing import Mapping

from objectives.base import Candidate, EvalContext, Objective, ObjectiveError


class SizeBytes(Objective):
    name = "size_bytes"
    unit = "bytes"
    direction = "minimize"
    reference = 1.0  # smaller than the baseline

    def evaluate(self, candidate: Candidate, context: EvalContext) -> float:
        try:
            size = os.path.getsize(candidate.artifact_path)
        except OSError as error:
            raise ObjectiveError(f"size_bytes: cannot stat artifact {candidate.artifact_path}: {error}") from None
        if size == 0:
            raise ObjectiveError(f"size_bytes: artifact {candidate.artifact_path} is empty")
        return float(size)

    def derived(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
        return {"compression_ratio": baseline[self.name] / metrics[self.name]}
