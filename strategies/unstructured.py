"""Unstructured pruning: zero the least important weights of every Conv/Linear, globally.

Importance is |w| relative to its layer's standard deviation, i.e. one global "quality"
threshold times each layer's std, as in Han et al. (2015). Raw |w| would empty wide
layers first, since their weights are small by initialisation.

With `pruning.per_layer_sparsity` listed in the search space, a trial may instead give each
layer its own sparsity: a scan, once per study, measures how far pruning each layer alone (by
|w|, at a range of densities) moves the uncompressed model's outputs, and the trial's overall
density is spread over the layers where it costs the least (`strategies.sensitivity`).

The result is a plain module with exact zeros in its weights; there is no mask
reparametrisation left behind. Zeros shrink the packed artifact (sparse storage) but not
latency, since dense runtimes do not skip them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from strategies import sensitivity
from strategies.base import CompressionError, Context, Strategy, StrategyConfig, weight_layers
from strategies.space import Anchor, ChoiceParam, FloatParam


class UnstructuredPruningError(CompressionError):
    pass


# Weight densities the per-layer scan measures; a trial's own density is interpolated.
SCAN_DENSITIES = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)


@dataclass(frozen=True)
class UnstructuredPruningConfig(StrategyConfig):
    """`sparsity`: the fraction of Conv/Linear weights zeroed. `per_layer`: each layer's
    share from the sensitivity scan, instead of one global threshold."""

    sparsity: float = 0.0
    per_layer: bool = False

    def validate(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"pruning.unstructured_sparsity must be in [0, 1), got {self.sparsity!r}")
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"pruning.per_layer_sparsity must be one of [False, True], got {self.per_layer!r}")


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, m.weight) for name, m in weight_layers(model)]


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


def _pruned(weight: torch.Tensor, density: float) -> torch.Tensor:
    """`weight` with all but its `density` fraction of largest |w| set to zero."""
    k = int(round((1.0 - density) * weight.numel()))
    out = weight.detach().clone()
    if k > 0:
        out.view(-1)[torch.argsort(weight.detach().abs().flatten(), stable=True)[:k]] = 0.0
    return out


def prune_per_layer_(model: nn.Module, sparsity: float, scan: dict | None) -> nn.Module:
    """Zero the `sparsity` fraction of all Conv/Linear weights, each layer by its own |w|, at
    the densities that cost the least by the sensitivity scan."""
    if not scan:
        raise UnstructuredPruningError("per-layer sparsity needs the sensitivity scan, and the study has none")
    weights = prunable_weights(model)
    densities = sensitivity.allocate({name: w.numel() for name, w in weights}, scan, 1.0 - sparsity)
    with torch.no_grad():
        for name, weight in weights:
            pruned = _pruned(weight, densities[name])
            if not pruned.any() and bool(weight.any()):
                raise UnstructuredPruningError(
                    f"per-layer sparsity {sparsity} removes every weight of layer {name}, cutting the network"
                )
            weight.copy_(pruned)
    return model


class UnstructuredPruning(Strategy):
    name = "unstructured_pruning"
    phase = "prune"
    default_space = {
        "pruning.unstructured_sparsity": FloatParam(0.0, 0.99, off=0.0),
        "pruning.per_layer_sparsity": ChoiceParam((False, True), off=False),
    }
    unlisted_space = {"pruning.per_layer_sparsity": ChoiceParam((False,), off=False)}
    anchors = (Anchor("unstructured-80", {"pruning.unstructured_sparsity": 0.8}, rank=4),)

    def suggest(self, trial: Any) -> UnstructuredPruningConfig:
        sparsity = self._suggest(trial, "pruning.unstructured_sparsity")
        per_layer = sparsity > 0 and self.suggest_option(trial, "pruning.per_layer_sparsity")
        return UnstructuredPruningConfig(sparsity, per_layer)

    def layer_record(self, model: nn.Module, config: UnstructuredPruningConfig) -> dict[str, str]:
        if not config.per_layer:
            return {}
        sparsities = (f"{n}:{1 - int(torch.count_nonzero(w)) / w.numel():.3f}" for n, w in prunable_weights(model))
        return {"pruning.layer_sparsity": " ".join(sparsities)}

    def sensitivity(self, model: nn.Module, x: torch.Tensor, batch_size: int) -> dict | None:
        """Each layer's sensitivity at SCAN_DENSITIES; None unless per-layer sparsity is searched."""
        if not self.offers("pruning.per_layer_sparsity"):
            return None
        return sensitivity.scan(model, x, batch_size, SCAN_DENSITIES, _pruned)

    def is_active(self, config: UnstructuredPruningConfig) -> bool:
        return config.sparsity > 0

    def apply(self, model: nn.Module, config: UnstructuredPruningConfig, context: Context) -> nn.Module:
        if config.per_layer:
            return prune_per_layer_(model, config.sparsity, context.sensitivity.get(self.name))
        return prune_weights_(model, config.sparsity)
