"""The objective contract: a named, unit-carrying number measured on a deployable model.

Objectives receive plain things (a file, a runner, a predict function) and never import
`strategies`, so they can also measure a model the user exported some other way. Each
objective also knows how it relates to the baseline: the search compares trials, draws the
hypervolume and checks limits in baseline units, and only the objective knows what those are.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Protocol, Union

import numpy as np
import torch
from torch import nn

# One batch as a runner takes it: a float32 array, or arrays by input name.
Batch = Union[np.ndarray, Mapping[str, np.ndarray]]


class ObjectiveError(Exception):
    """A measurement could not produce a finite number. The trial fails with this reason."""


class Candidate(Protocol):
    """A compressed model in its deployable form: anything with these attributes.

    - `artifact_path`: the packed weights file as stored.
    - `run`: runs one batch on the runtime (what latency times). Takes a float32 numpy array, or
      for a model with named inputs (token ids, masks), numpy arrays by name.
    - `predict`: logits for a batch of inputs, as the runtime computes them. The inputs are a
      tensor or named tensors that index and count like one (``x[i:j]``, ``len(x)``).
    - `model`: the PyTorch module, for parameter and MAC counts.
    """

    artifact_path: Path
    run: Callable[[Batch], object]
    predict: Callable[[Any], torch.Tensor]
    model: nn.Module | None


@dataclass(frozen=True)
class LatencySettings:
    """How latency is timed. The first batch size is the searched objective; the others
    are reported next to it (``latency_ms_b64``). `max_spread` flags noisy measurements."""

    batch_sizes: tuple[int, ...] = (1,)
    threads: int = 1
    warmup: int = 10
    repeats: int = 50
    max_spread: float = 0.15
    # Named inputs (token ids, masks) are timed at this many tokens; None: the example's own length.
    sequence_length: int | None = None

    def __post_init__(self) -> None:
        length = self.sequence_length
        if length is not None and (not _whole(length) or length < 1):
            raise ValueError(f"latency.sequence_length must be a whole number >= 1 or null, got {length!r}")
        sizes = self.batch_sizes
        if not isinstance(sizes, tuple) or not sizes or not all(_whole(b) and b >= 1 for b in sizes):
            raise ValueError(f"latency.batch_sizes must be a non-empty list of whole numbers >= 1, got {sizes!r}")
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"latency.batch_sizes lists a batch size twice: {list(sizes)}")
        for key in ("threads", "repeats"):
            value = getattr(self, key)
            if not _whole(value) or value < 1:
                raise ValueError(f"latency.{key} must be a whole number >= 1, got {value!r}")
        if not _whole(self.warmup) or self.warmup < 0:
            raise ValueError(f"latency.warmup must be a whole number >= 0, got {self.warmup!r}")
        if not isinstance(self.max_spread, (int, float)) or not self.max_spread > 0:
            raise ValueError(f"latency.max_spread must be a number > 0, got {self.max_spread!r}")

    @property
    def batch_size(self) -> int:
        return self.batch_sizes[0]


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EvalContext:
    """What objectives need besides the candidate. Built once per study."""

    val_x: Any  # a tensor, or named tensors that index and count like one
    val_y: torch.Tensor
    example_inputs: Any
    latency: LatencySettings = field(default_factory=LatencySettings)
    eval_batch_size: int = 1000
    # The baseline's runner. Latency times it interleaved with the candidate's, so that
    # `speedup` is a same-run ratio that machine-wide slowdowns affect equally.
    reference_run: Callable[[Batch], object] | None = None
    # The baseline's own outputs on val_x, for task metrics scored against them (fidelity).
    val_reference: torch.Tensor | None = None


class Objective(ABC):
    """Subclasses set `name`, `unit`, `direction` and `reference`, and implement `evaluate`.

    Baseline units: `relative` turns a trial's figures into a quantity to minimise with the
    baseline at 1 (or, for a fraction such as accuracy, at 0), `reference` is the worst value
    in those units that still counts toward the hypervolume, and a limit in `constraints`
    applies to the metric `limit_metric` (the objective's own by default).
    """

    name: ClassVar[str]
    unit: ClassVar[str]
    direction: ClassVar[Literal["maximize", "minimize"]]
    reference: ClassVar[float]
    limit_metric: ClassVar[str | None] = None
    # A noisy figure (latency) that the finalists measure again, alone and longer.
    final_repeat: ClassVar[bool] = False
    # A task's quality figure (objectives.task.TaskMetric): a study scores by exactly one.
    task_metric: ClassVar[bool] = False

    @abstractmethod
    def evaluate(self, candidate: Candidate, context: EvalContext) -> float:
        """A finite float, or raise ObjectiveError."""

    def measure(self, candidate: Candidate, context: EvalContext) -> dict[str, float]:
        """The objective value under `name`, plus any extra metrics worth logging."""
        return {self.name: self.evaluate(candidate, context)}

    def relative(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> float:
        """This objective of one trial in baseline units, to minimise: a ratio to the baseline."""
        return metrics[self.name] / baseline[self.name]

    def derived(self, metrics: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
        """Figures against the baseline worth recording beside the value (compression_ratio, ...)."""
        return {}

    def unit_of_limit(self, baseline: Mapping[str, float]) -> float:
        """What one baseline unit of `limit_metric` is, to add violations of different limits."""
        return baseline[self.name]

    @classmethod
    def limit(cls) -> str:
        """The metric a limit in `constraints` sets for this objective."""
        return cls.limit_metric or cls.name


def finite(name: str, value: float) -> float:
    """Return `value` as a float, or raise ObjectiveError if it is NaN or infinite."""
    value = float(value)
    if not math.isfinite(value):
        raise ObjectiveError(f"{name} is not finite: {value}")
    return value
