"""Top-1 accuracy on the validation split, computed on the runtime's own outputs."""

from __future__ import annotations

from typing import Callable

import torch

from objectives.base import Candidate, EvalContext, Objective, ObjectiveError


def top1_accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> float:
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

    def evaluate(self, candidate: Candidate, context: EvalContext) -> float:
        return top1_accuracy(candidate.predict, context.val_x, context.val_y, context.eval_batch_size)
