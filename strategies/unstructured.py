"""Unstructured pruning: zero the least important weights of every weight layer, globally.

Importance is |w| relative to its layer's standard deviation, i.e. one global "quality"
threshold times each layer's std, as in Han et al. (2015). Raw |w| would empty wide
layers first, since their weights are small by initialisation.

With `pruning.per_layer_sparsity` listed in the search space, a trial may instead give each
layer its own sparsity: a scan, once per study, measures how far pruning each layer alone (by
|w|, at a range of densities) moves the uncompressed model's outputs, and the trial's overall
density is spread over the layers where it costs the least (`strategies.sensitivity`).

With `pruning.gradual` listed, a trial that fine-tunes may instead prune gradually (Zhu &
Gupta, 2017): the fine-tune starts again from the unpruned weights and the sparsity rises on
a cubic schedule over its first RAMP_SHARE of updates, by the same ranking (and per-layer
allocation), to exactly the same target; the rest of the fine-tune recovers at the target.
`apply` still prunes at once, so a trial that does not fine-tune gets the one-shot result;
`before_finetune` hands the fine-tune a step hook (`Context.on_step`) that does the rest.

The result is a plain module with exact zeros in its weights; there is no mask
reparametrisation left behind. Zeros shrink the packed artifact (sparse storage) but not
latency, since dense runtimes do not skip them.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from strategies import sensitivity
from strategies.base import CompressionError, Context, Strategy, StrategyConfig, weight_layers
from strategies.space import Anchor, ChoiceParam, FloatParam


class UnstructuredPruningError(CompressionError):
    pass


# Weight densities the per-layer scan measures; a trial's own density is interpolated.
SCAN_DENSITIES = (1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)
# Gradual pruning: the sparsity it starts the fine-tune at, the share of the fine-tune's updates
# over which it rises to the target (the rest recover at the target, while the cosine learning
# rate decays; with 2 epochs the search's after-first-epoch check sees the target sparsity),
# and how many times it prunes on the way.
GRADUAL_INITIAL_SPARSITY = 0.0
RAMP_SHARE = 0.5
RAMP_PRUNINGS = 20


@dataclass(frozen=True)
class UnstructuredPruningConfig(StrategyConfig):
    """`sparsity`: the fraction of layer weights zeroed. `per_layer`: each layer's
    share from the sensitivity scan, instead of one global threshold. `gradual`: reach it
    during the fine-tune, when the trial fine-tunes (else at once)."""

    sparsity: float = 0.0
    per_layer: bool = False
    gradual: bool = False

    def validate(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"pruning.unstructured_sparsity must be in [0, 1), got {self.sparsity!r}")
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"pruning.per_layer_sparsity must be one of [False, True], got {self.per_layer!r}")
        if not isinstance(self.gradual, bool):
            raise ValueError(f"pruning.gradual must be one of [False, True], got {self.gradual!r}")


def _float_weight(module: nn.Module) -> nn.Parameter:
    """The float Parameter behind `module.weight`, also while a parametrization (the
    quantization-aware fine-tune's fake quantization) computes `weight` from it."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def prunable_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Each weight layer's float weight Parameter, by layer name."""
    return [(name, _float_weight(m)) for name, m in weight_layers(model)]


def layer_scale(weight: torch.Tensor) -> torch.Tensor:
    """The layer's standard deviation, which its |w| are measured against."""
    return weight.detach().std(correction=0).clamp_min(1e-12)


def prune_weights_(model: nn.Module, sparsity: float, scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Zero the `sparsity` fraction of smallest |w| / layer std across all layer weights,
    in place. `scales`: each layer's std from before (gradual pruning: the unpruned layer's)."""
    weights = prunable_weights(model)
    if not weights:
        raise UnstructuredPruningError("unstructured pruning found no Conv2d or Linear weights")
    scores = torch.cat(
        [(w.detach().abs() / (scales[name] if scales else layer_scale(w))).flatten() for name, w in weights]
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


def layer_densities(model: nn.Module, sparsity: float, scan: dict | None) -> dict[str, float]:
    """Each layer's weight density for the overall `sparsity`, where it costs the least by the
    sensitivity scan."""
    if not scan:
        raise UnstructuredPruningError("per-layer sparsity needs the sensitivity scan, and the study has none")
    return sensitivity.allocate({name: w.numel() for name, w in prunable_weights(model)}, scan, 1.0 - sparsity)


def _prune_layers_(model: nn.Module, densities: dict[str, float], sparsity: float) -> nn.Module:
    """Keep each layer's `densities[name]` fraction of largest |w|, zero the rest, in place."""
    with torch.no_grad():
        for name, weight in prunable_weights(model):
            pruned = _pruned(weight, densities[name])
            if not pruned.any() and bool(weight.any()):
                raise UnstructuredPruningError(
                    f"per-layer sparsity {sparsity} removes every weight of layer {name}, cutting the network"
                )
            weight.copy_(pruned)
    return model


def prune_per_layer_(model: nn.Module, sparsity: float, scan: dict | None) -> nn.Module:
    """Zero the `sparsity` fraction of all layer weights, each layer by its own |w|, at
    the densities that cost the least by the sensitivity scan."""
    return _prune_layers_(model, layer_densities(model, sparsity, scan), sparsity)


# ---------------------------------------------------------------- gradual pruning


def ramp(step: int, total_steps: int) -> float | None:
    """Where gradual pruning stands after fine-tune update `step` of `total_steps` (0: before
    the first): the share (1 - t/n)^3 of the way from the target back to the starting
    sparsity still to go, on the steps where it prunes; None on the others."""
    end = max(1, math.ceil(total_steps * RAMP_SHARE))
    every = max(1, math.ceil(end / RAMP_PRUNINGS))
    if step > end or (step % every and step != end):
        return None
    return (1.0 - step / end) ** 3


@dataclass
class GradualPruning:
    """The fine-tune's step hook (`Context.on_step`) of one gradually pruned model.

    Before the first update it puts back the weights the one-shot prune removed (`unpruned`) and
    prunes to the starting sparsity; then, on the steps `ramp` names, to the sparsity
    s_f + (s_i - s_f)(1 - t/n)^3, which is the target itself (s_f) at t = n. Weights already
    zero rank first, so what was pruned stays pruned. The global ranking measures |w| against
    each layer's std before pruning, as the one-shot prune does: against the std of a layer
    already pruned (mostly zeros), its few survivors score alike, and the next step can
    empty it. `then` is the hook it was installed over.
    """

    config: UnstructuredPruningConfig
    unpruned: dict[str, torch.Tensor]
    densities: dict[str, float] | None  # each layer's at the target (per-layer sparsity), or None
    then: Callable[[nn.Module, int, int], bool]
    scales: dict[str, torch.Tensor] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.scales = {name: layer_scale(weight) for name, weight in self.unpruned.items()}

    def __call__(self, model: nn.Module, step: int, total_steps: int) -> bool:
        changed = self.then(model, step, total_steps)
        togo = ramp(step, total_steps) if total_steps > 0 else None
        if togo is None:
            return changed
        if step == 0:
            with torch.no_grad():
                for name, weight in prunable_weights(model):
                    weight.copy_(torch.where(weight == 0, self.unpruned[name].to(weight), weight))
        final, initial = self.config.sparsity, GRADUAL_INITIAL_SPARSITY
        if self.densities is None:
            prune_weights_(model, final + (initial - final) * togo, self.scales)
        else:  # each layer on its own schedule to its own target, so none overshoots it
            start = 1.0 - initial
            _prune_layers_(model, {n: d + (start - d) * togo for n, d in self.densities.items()}, final)
        return True


# A gradually pruned model's weights before its one-shot prune, from `apply` to `before_finetune`.
_UNPRUNED: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


class UnstructuredPruning(Strategy):
    name = "unstructured_pruning"
    phase = "prune"
    default_space = {
        "pruning.unstructured_sparsity": FloatParam(0.0, 0.99, off=0.0),
        "pruning.per_layer_sparsity": ChoiceParam((False, True), off=False),
        "pruning.gradual": ChoiceParam((False, True), off=False),
    }
    unlisted_space = {
        "pruning.per_layer_sparsity": ChoiceParam((False,), off=False),
        "pruning.gradual": ChoiceParam((False,), off=False),
    }
    anchors = (Anchor("unstructured-80", {"pruning.unstructured_sparsity": 0.8}, rank=4),)

    def suggest(self, trial: Any) -> UnstructuredPruningConfig:
        sparsity = self._suggest(trial, "pruning.unstructured_sparsity")
        per_layer = sparsity > 0 and self.suggest_option(trial, "pruning.per_layer_sparsity")
        gradual = sparsity > 0 and self.suggest_option(trial, "pruning.gradual")
        return UnstructuredPruningConfig(sparsity, per_layer, gradual)

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
        unpruned = {name: w.detach().clone() for name, w in prunable_weights(model)} if config.gradual else None
        if config.per_layer:
            model = prune_per_layer_(model, config.sparsity, context.sensitivity.get(self.name))
        else:
            model = prune_weights_(model, config.sparsity)
        if unpruned is not None:
            _UNPRUNED[model] = unpruned
        return model

    def before_finetune(
        self, model: nn.Module, config: UnstructuredPruningConfig, context: Context
    ) -> tuple[UnstructuredPruningConfig, Context]:
        """With gradual pruning, the fine-tune's step hook that prunes gradually instead. The
        model stays pruned at once, for the other strategies to see and in case no fine-tune
        runs after all."""
        unpruned = _UNPRUNED.pop(model, None)
        if unpruned is None:
            return config, context
        densities = (
            layer_densities(model, config.sparsity, context.sensitivity.get(self.name)) if config.per_layer else None
        )
        hook = GradualPruning(config, unpruned, densities, context.on_step)
        return config, dataclasses.replace(context, on_step=hook)
