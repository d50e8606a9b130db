"""Top-1 accuracy, the default task metric: on the validation split, on the runtime's own outputs."""

from __future__ import annotations

from typing import Any, Callable

import torch

from objectives.task import TaskMetric


class Accuracy(TaskMetric):
    name = "accuracy"

    def score(self, outputs: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None) -> float:
        return float((outputs.argmax(dim=1) == y).double().mean())


def top1_accuracy(predict: Callable[[Any], torch.Tensor], x: Any, y: torch.Tensor, batch_size: int = 1000) -> float:
    return Accuracy().on(predict, x, y, batch_size=batch_size)
