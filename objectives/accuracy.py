"""Top-1 accuracy on the validation split, computed on the runtime's own outputs."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from objectives.base import Candidate, EvalContext, Objective, ObjectiveError


def top1_accuracy(predict: Callable[[Any], torch.Tensor], x: Any, y: torch.Tensor, batch_size: int = 1000) -> float:
    if len(x) == 0:
        raise ObjectiveError("accuracy needs at least one sample")
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = predict(x[i : i + batch_size])
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        if bad:
            raise ObjectiveError(f"accuracy: {bad} of {len(logits)} rows of logits are not finite")
        correct += int((logits.argmax(dim=1) == y[i : i + batch_size]).sum())
    return correct / len(x)


class Accuracy(Objective):
    name = "accuracy"
    unit = "fraction"
    direction = "maximize"
    reference = 0.10  # at most 10 points less accurate than the baseline
    limit_metric = "accuracy_drop"  # constraints.max_accuracy_drop, in points of the fraction

    def evaluate(self, candidate: Candidate, context: EvalContext) -> float:
        return top1_accuracy(candidate.predict, context.val_x, context.val_y, context.eval_batch_size)

    def relative(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> float:
        """The accuracy drop: a difference, since accuracy is already a fraction."""
        return baseline[self.name] - metrics[self.name]

    def derived(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
        return {"accuracy_drop": self.relative(metrics, baseline)}

    def unit_of_limit(self, baseline: Mapping[str, float]) -> float:
        return 1.0
