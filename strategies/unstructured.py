"""Unstructured pruning: zero the least important weights of every Conv/Linear, globally.

Importance is |w| relative to its layer's standard deviation, i.e. one global "quality"
threshold times each layer's std, as in Han et al. (2015). Raw |w| would empty wide
layers first, since their weights are small by initialisation.

The result is a plain module with exact zeros in its weights; there is no mask
reparametrisation left behind. Zeros shrink the packed artifact (sparse storage) but not
latency, since dense runtimes do not skip them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from strategies.base import CompressionError, Context, FloatParam, Strategy, StrategyConfig


class UnstructuredPruningError(CompressionError):
    pass


@dataclass(frozen=True)
class UnstructuredPruningConfig(StrategyConfig):
    sparsity: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"pruning.unstructured_sparsity must be in [0, 1), got {self.sparsity!r}")


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, m.weight) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def prune_weights_(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the `sparsity` fraction of smallest |w| across all Conv/Linear weights, in place."""
    weights = prunable_weights(model)
    if not weights:
        raise UnstructuredPruningError("unstructured pruning found no Conv2d or Linear weights")
    scores = torch.cat(
        [(w.detach().abs() / w.detach().std(correction=0).clamp_min(1e-12)).flatten() for _, w in weights]
    )
    k = int(round(sparsity * scores.numel()))
    if k == 0:
        return model
    # Rank instead of thresholding, so ties at the threshold cannot overshoot the target.
    order = torch.argsort(scores, stable=True)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[order[:k]] = False
    start = 0
    with torch.no_grad():
        for name, weight in weights:
            mask = keep[start : start + weight.numel()].view_as(weight)
            start += weight.numel()
            if not mask.any() and bool((weight != 0).any()):
                raise UnstructuredPruningError(
                    f"unstructured sparsity {sparsity} removes every weight of layer {name}, cutting the network"
                )
            weight.masked_fill_(~mask, 0.0)  # +0.0, not the -0.0 that mul_ leaves
    return model


class UnstructuredPruning(Strategy):
    name = "unstructured_pruning"
    config_cls = UnstructuredPruningConfig
    default_space = {"pruning.unstructured_sparsity": FloatParam(0.0, 0.99)}

    def suggest(self, trial: Any) -> UnstructuredPruningConfig:
        key = "pruning.unstructured_sparsity"
        return UnstructuredPruningConfig(sparsity=self.space[key].suggest(trial, key))

    def is_active(self, config: UnstructuredPruningConfig) -> bool:
        return config.sparsity > 0

    def apply(self, model: nn.Module, config: UnstructuredPruningConfig, context: Context) -> nn.Module:
        return prune_weights_(model, config.sparsity)
