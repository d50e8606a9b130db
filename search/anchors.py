"""Anchor configurations enqueued first in every new study.

Each anchor is one technique alone at a setting known to work reasonably. Evaluating them
first puts the single techniques on the front from the start, so the joint search's front
is never worse than what any one of them gives, and the sampler starts from sensible
points instead of only random ones.
"""

from __future__ import annotations

from typing import Any

import optuna

from strategies.base import ChoiceParam, Param, Strategy

# What "this technique off" means for each switch-like parameter.
OFF: dict[str, Any] = {
    "pruning.structured_ratio": 0.0,
    "pruning.unstructured_sparsity": 0.0,
    "pruning.per_layer_sparsity": False,
    "quantization.weight_bits": 32,
    "quantization.mixed_precision": False,
    "distillation.epochs": 0,
}
HIGHEST = object()  # the top of the configured range
DISTILL = {  # a distillation fine-tune that works on every workload we measured
    "distillation.epochs": HIGHEST,
    "distillation.temperature": 4.0,
    "distillation.alpha": 0.7,
    "distillation.lr": 3e-3,
}

ANCHORS: dict[str, dict[str, Any]] = {
    "int8": {"quantization.weight_bits": 8, "quantization.activation_bits": 8},
    "4-bit": {"quantization.weight_bits": 4, "quantization.activation_bits": 32},
    "structured-50": {"pruning.structured_ratio": 0.5},
    "unstructured-80": {"pruning.unstructured_sparsity": 0.8},
    "student-half": {"pruning.structured_ratio": 0.5, **DISTILL},
    # The narrowest student the space allows: the fastest, smallest end of structured
    # pruning, which a sampler's density reaches last (measured: README, Samplers).
    "student-smallest": {"pruning.structured_ratio": HIGHEST, **DISTILL},
}


def _admits(param: Param, value: Any) -> bool:
    if isinstance(param, ChoiceParam):
        return value in param.choices
    return param.low <= value <= param.high


def anchor_params(strategies: list[Strategy]) -> dict[str, dict[str, Any]]:
    """The anchors this search space can express, as full parameter assignments.

    An anchor is skipped when a value that defines it lies outside the configured space, or
    when it repeats an earlier one; an "off" value outside the space is left to the sampler.
    """
    space: dict[str, Param] = {key: param for s in strategies for key, param in s.space.items()}
    anchors = {}
    for name, defining in ANCHORS.items():
        params = {k: v for k, v in OFF.items() if k in space and _admits(space[k], v)}
        fits = True
        for key, value in defining.items():
            if key not in space:
                fits = False
                break
            if value is HIGHEST:
                value = space[key].values()[-1]
            if not _admits(space[key], value):
                fits = False
                break
            params[key] = value
        if fits and params not in anchors.values():  # the narrowest student may be the half-width one
            anchors[name] = params
    return anchors


def enqueue_anchors(study: optuna.Study, strategies: list[Strategy]) -> list[str]:
    """Enqueue every expressible anchor into a study that has no trials yet."""
    if study.trials:
        return []
    anchors = anchor_params(strategies)
    for name, params in anchors.items():
        study.enqueue_trial(params, user_attrs={"anchor": name})
    return list(anchors)
