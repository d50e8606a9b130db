"""The fixed compression pipeline: structured → unstructured → distillation → quantization.

Structured pruning goes first so every later step works on the smaller model; fine-tuning
comes after all weight removal so it can recover from it; quantization is last so the
deployed integer codes are exactly the ones measured.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import nn

from strategies.base import Context, Strategy, StrategyConfig
from strategies.distillation import Distillation
from strategies.quantization import Quantization, resolve_layer_bits
from strategies.structured import StructuredPruning
from strategies.unstructured import UnstructuredPruning

PIPELINE: tuple[type[Strategy], ...] = (StructuredPruning, UnstructuredPruning, Distillation, Quantization)


def all_space_keys() -> list[str]:
    return sorted(key for cls in PIPELINE for key in cls.default_space)


def build_strategies(search_space: Mapping[str, Any]) -> list[Strategy]:
    """The strategies the search space turns on, in pipeline order.

    A strategy is on when any of its parameters appear in `search_space`.
    """
    valid = all_space_keys()
    unknown = sorted(set(search_space) - set(valid))
    if unknown:
        raise ValueError(f"unknown search_space key {unknown[0]!r}; valid keys are {valid}")
    strategies = []
    for cls in PIPELINE:
        mine = {k: v for k, v in search_space.items() if k in cls.default_space}
        if mine:
            strategies.append(cls(mine))
    if not strategies:
        raise ValueError(f"search_space is empty; name at least one of {valid}")
    return strategies


def suggest(strategies: list[Strategy], trial: Any) -> dict[str, StrategyConfig]:
    return {strategy.name: strategy.suggest(trial) for strategy in strategies}


def compress(
    model: nn.Module,
    strategies: list[Strategy],
    configs: Mapping[str, StrategyConfig],
    context: Context,
) -> nn.Module:
    """Apply every active strategy in order. `model` is modified; pass a copy."""
    configs = dict(configs)
    quant = next((s for s in strategies if isinstance(s, Quantization)), None)
    pending = quant is not None
    for strategy in strategies:
        if pending and not isinstance(strategy, (StructuredPruning, UnstructuredPruning)):
            # Pruning is done: allot mixed-precision widths to the weights that are left.
            pending = False
            quant_config = resolve_layer_bits(model, configs[quant.name], context.sensitivity.get(quant.name))
            configs[quant.name] = quant_config
            if quant_config.weight_bits < 32:
                # Fine-tuning trains against the weights it will be deployed with.
                context = dataclasses.replace(context, fake_quant=Quantization.training_simulation(quant_config))
        config = configs[strategy.name]
        if strategy.is_active(config):
            context.report(f"{strategy.name}: {config.to_dict()}")
            model = strategy.apply(model, config, context)
    return model.eval()
