"""Task metrics: the quality figure a workload is scored by.

Each is a fraction in [0, 1], higher is better, computed over a whole split on the runtime's
own outputs. A study has one, `workload.metric`: the objective the search maximises, logged
under its own name (``accuracy``, ``macro_f1``, ``embedding_fidelity``). Its drop against the
baseline, in points of the fraction (``<metric>_drop``), is what `constraints.max_accuracy_drop`
limits and what the pick compares. A new task metric is one subclass plus `register_objective`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable, ClassVar, Mapping

import torch

from objectives.base import Candidate, EvalContext, Objective, ObjectiveError


def outputs_of(name: str, predict: Callable[[Any], torch.Tensor], x: Any, batch_size: int = 1000) -> torch.Tensor:
    """`predict` over all of `x` in batches, as one tensor of rows; ObjectiveError if any is not finite."""
    if len(x) == 0:
        raise ObjectiveError(f"{name} needs at least one sample")
    outputs = torch.cat([predict(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    bad = int((~torch.isfinite(outputs)).flatten(1).any(dim=1).sum())
    if bad:
        raise ObjectiveError(f"{name}: {bad} of {len(outputs)} rows of outputs are not finite")
    return outputs


class TaskMetric(Objective):
    """`score` turns a split's outputs (logits, or embeddings) into the figure."""

    unit = "fraction"
    direction = "maximize"
    reference = 0.10  # at most 10 points below the baseline still counts toward the hypervolume
    task_metric = True
    # Scored against the baseline's own outputs on the same split (fidelity), not only the labels.
    needs_reference: ClassVar[bool] = False
    # What the model's outputs are: "logits" (classes, compared by argmax) or "embeddings".
    outputs: ClassVar[str] = "logits"

    @abstractmethod
    def score(self, outputs: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None) -> float:
        """The figure for outputs of a whole split, its labels and the baseline's outputs."""

    def on(
        self, predict: Callable[[Any], torch.Tensor], x: Any, y: torch.Tensor, reference: Any = None, batch_size=1000
    ) -> float:
        """The figure of `predict` on one split (`reference`: the baseline's outputs on it)."""
        if self.needs_reference and reference is None:
            raise ObjectiveError(f"{self.name} needs the baseline's outputs on the same samples")
        return float(self.score(outputs_of(self.name, predict, x, batch_size), y, reference))

    def evaluate(self, candidate: Candidate, context: EvalContext) -> float:
        return self.on(candidate.predict, context.val_x, context.val_y, context.val_reference, context.eval_batch_size)

    def trivial(self, outputs: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None = None) -> float:
        """The figure of a model that ignores its input, shaped like `outputs` (the baseline's):
        the majority class for logits, the mean embedding for embeddings."""
        if self.outputs == "embeddings":
            constant = outputs.mean(0, keepdim=True).expand_as(outputs)
        else:
            majority = torch.full_like(y, int(torch.bincount(y).argmax()))
            constant = torch.nn.functional.one_hot(majority, outputs.shape[1]).float()
        return float(self.score(constant, y, reference))

    def relative(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> float:
        """The drop: a difference, since the figure is already a fraction."""
        return baseline[self.name] - metrics[self.name]

    def derived(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
        return {self.limit(): self.relative(metrics, baseline)}

    def unit_of_limit(self, baseline: Mapping[str, float]) -> float:
        return 1.0

    @classmethod
    def limit(cls) -> str:
        return f"{cls.name}_drop"


class MacroF1(TaskMetric):
    """The unweighted mean of each class's F1, over the classes in the labels or the predictions
    (as scikit-learn's ``f1_score(average="macro")``): for imbalanced classification."""

    name = "macro_f1"

    def score(self, outputs: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None) -> float:
        predicted = outputs.argmax(dim=1)
        f1 = []
        for c in torch.unique(torch.cat([y, predicted])).tolist():
            tp = int(((predicted == c) & (y == c)).sum())
            wrong = int((predicted != y).logical_and((predicted == c) | (y == c)).sum())  # fp + fn
            f1.append(2 * tp / (2 * tp + wrong))
        return sum(f1) / len(f1)


class EmbeddingFidelity(TaskMetric):
    """Mean cosine similarity of each sample's embedding to the baseline's: for an encoder used
    as an embedder, how much of the original model's geometry the compressed one keeps."""

    name = "embedding_fidelity"
    needs_reference = True
    outputs = "embeddings"

    def score(self, outputs: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None) -> float:
        if reference is None or reference.shape != outputs.shape:
            shape = None if reference is None else tuple(reference.shape)
            raise ObjectiveError(
                f"embedding_fidelity: outputs {tuple(outputs.shape)} and baseline outputs {shape} differ"
            )
        cosine = torch.nn.functional.cosine_similarity(
            outputs.flatten(1).double(), reference.flatten(1).double(), dim=1
        )
        return float(cosine.mean())
