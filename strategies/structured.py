"""Structured pruning: physically remove channels and neurons with Torch-Pruning.

Torch-Pruning's dependency graph keeps coupled layers consistent (a conv's output
channels, the BatchNorm after it, the next layer's inputs), so parameters and MACs really
shrink. The classifier's outputs are never pruned, so the output shape is unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from strategies.base import CompressionError, Context, Strategy, StrategyConfig, weight_layers
from strategies.inputs import Inputs, forward
from strategies.space import Anchor, FloatParam

logger = logging.getLogger(__name__)


class StructuredPruningError(CompressionError):
    pass


@dataclass(frozen=True)
class StructuredPruningConfig(StrategyConfig):
    ratio: float = 0.0

    def validate(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"pruning.structured_ratio must be in [0, 1), got {self.ratio!r}")


def _widths(model: nn.Module) -> dict[str, int]:
    """Each weight layer's output width (channels, features, embedding dims), by name."""
    return {name: m.weight.shape[1 if isinstance(m, nn.Embedding) else 0] for name, m in weight_layers(model)}


def _output_layers(model: nn.Module, example_inputs: Inputs) -> list[nn.Module]:
    """The Conv/Linear layers whose outputs are the model's outputs (found by tracing)."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, forward_fn=forward)
    layers = {m for _, m in weight_layers(model)}
    return [
        module for module, node in graph.module2node.items() if module in layers and not _feeds(layers, node, set())
    ]


def _feeds(layers: set[nn.Module], node: Any, seen: set) -> bool:
    """Whether any of `layers` consumes this node's output, through shape-keeping ops."""
    for out in node.outputs:
        if id(out) in seen:
            continue
        seen.add(id(out))
        if out.module in layers or _feeds(layers, out, seen):
            return True
    return False


def prune_channels_(model: nn.Module, ratio: float, example_inputs: Inputs) -> nn.Module:
    """Remove `ratio` of every hidden layer's channels by L1 magnitude, in place."""
    model.eval()
    widths = _widths(model)
    with torch.no_grad():
        out_width = model(example_inputs).shape[-1]
    try:
        ignored = _output_layers(model, example_inputs)
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=ignored,
            forward_fn=forward,
        )
        pruner.step()
    except CompressionError:
        raise
    except Exception as error:  # Torch-Pruning could not trace or prune this architecture
        raise StructuredPruningError(
            f"structured pruning cannot handle this model: {type(error).__name__}: {error}"
        ) from error
    after = _widths(model)
    for name, width in after.items():
        if width == 0:
            raise StructuredPruningError(f"structured pruning at ratio {ratio} pruned layer {name} to zero width")
    try:
        with torch.no_grad():
            shape = model(example_inputs).shape
    except Exception as error:
        raise StructuredPruningError(f"the model no longer runs after structured pruning: {error}") from error
    if shape[-1] != out_width:
        raise StructuredPruningError(f"structured pruning changed the output width from {out_width} to {shape[-1]}")
    logger.debug("structured pruning %.2f: widths %s -> %s", ratio, widths, after)
    return model


class StructuredPruning(Strategy):
    name = "structured_pruning"
    phase = "prune"
    default_space = {"pruning.structured_ratio": FloatParam(0.0, 0.9, off=0.0)}
    anchors = (Anchor("structured-50", {"pruning.structured_ratio": 0.5}, rank=3),)

    def suggest(self, trial: Any) -> StructuredPruningConfig:
        return StructuredPruningConfig(ratio=self._suggest(trial, "pruning.structured_ratio"))

    def is_active(self, config: StructuredPruningConfig) -> bool:
        return config.ratio > 0

    def apply(self, model: nn.Module, config: StructuredPruningConfig, context: Context) -> nn.Module:
        return prune_channels_(model, config.ratio, context.example_inputs)
