"""The fixed compression pipeline: structured → unstructured → distillation → quantization.

Structured pruning goes first so every later step works on the smaller model; fine-tuning
comes after all weight removal so it can recover from it; quantization is last so the
deployed integer codes are exactly the ones measured. The order is the strategies' phases
(`strategies.registry.pipeline`); this module knows no strategy by name.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from strategies.base import Context, Strategy, StrategyConfig


def suggest(strategies: list[Strategy], trial: Any) -> dict[str, StrategyConfig]:
    return {strategy.name: strategy.suggest(trial) for strategy in strategies}


def _apply(model: nn.Module, strategy: Strategy, config: StrategyConfig, context: Context) -> nn.Module:
    if not strategy.is_active(config):
        return model
    context.report(f"{strategy.name}: {config.to_dict()}")
    return strategy.apply(model, config, context)


def compress(
    model: nn.Module,
    strategies: list[Strategy],
    configs: Mapping[str, StrategyConfig],
    context: Context,
) -> tuple[nn.Module, dict[str, StrategyConfig]]:
    """Apply every active strategy in order. `model` is modified; pass a copy.

    Returns the compressed model in eval mode and the configs as applied: a strategy's
    `before_finetune` hook, called on every strategy once pruning is done, may have
    resolved its config further (the mixed-precision widths, for one).
    """
    configs = dict(configs)
    for strategy in (s for s in strategies if s.phase == "prune"):
        model = _apply(model, strategy, configs[strategy.name], context)
    for strategy in strategies:
        configs[strategy.name], context = strategy.before_finetune(model, configs[strategy.name], context)
    for strategy in (s for s in strategies if s.phase != "prune"):
        model = _apply(model, strategy, configs[strategy.name], context)
    return model.eval(), configs
