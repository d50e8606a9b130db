"""Structured pruning of BERT-style Transformer encoders: attention heads, FFN neurons, layers.

A BERT-style layer (BERT, MiniLM, RoBERTa, ELECTRA in Hugging Face's naming) has
``attention.self.{query,key,value}``, ``attention.output.dense``, ``intermediate.dense`` and
``output.dense``. Heads and FFN neurons are removed for real by Torch-Pruning, which carries
each removal through the coupled layers (a head's rows of query/key/value and its columns of
the attention output; a neuron's row of the intermediate layer and its column of the output
layer), ranked by L1 magnitude, the same fraction in every layer. The layers that write the
shared hidden width are left whole, so the residual stream keeps its width. Layers are
removed from the top, keeping the bottom ones (dropping the top layers lost least in Sajjad
et al., 2023), for a distillation fine-tune to train a shallower student, as DistilBERT does.
Models with other naming (DistilBERT's ``q_lin``/``ffn.lin1``, GPT-style blocks) are refused
with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch_pruning as tp
from torch import nn

from strategies.base import CompressionError, Context, Strategy, StrategyConfig
from strategies.inputs import Inputs, forward
from strategies.space import Anchor, FloatParam

logger = logging.getLogger(__name__)

_BLOCK = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
_FFN = ("intermediate.dense", "output.dense")


class EncoderPruningError(CompressionError):
    pass


@dataclass(frozen=True)
class EncoderPruningConfig(StrategyConfig):
    """Fractions removed: of each layer's attention heads, of each layer's FFN neurons, of the layers."""

    head_ratio: float = 0.0
    ffn_ratio: float = 0.0
    layer_ratio: float = 0.0

    def validate(self) -> None:
        for key in ("head_ratio", "ffn_ratio", "layer_ratio"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"pruning.{key} must be in [0, 1), got {value!r}")


def _is_block(module: nn.Module) -> bool:
    names = dict(module.named_modules())
    return all(isinstance(names.get(path), nn.Linear) for path in _BLOCK + _FFN)


def encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of BERT-style layers (its name and the ModuleList), or EncoderPruningError."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(_is_block(m) for m in module):
            return name, module
    raise EncoderPruningError(
        "no BERT-style encoder layers in this model (a ModuleList of layers with "
        f"{', '.join(_BLOCK + _FFN)}); encoder pruning handles Hugging Face BERT-style encoders only"
    )


def prune_encoder_(model: nn.Module, config: EncoderPruningConfig, example_inputs: Inputs) -> nn.Module:
    """Remove heads, FFN neurons and top layers in place, as `config` says."""
    _, layers = encoder_layers(model)
    keep = max(1, round(len(layers) * (1 - config.layer_ratio)))
    del layers[keep:]
    attention = [layer.attention.self for layer in layers]
    heads = {a: a.query.out_features // a.attention_head_size for a in attention}
    # Torch-Pruning keeps int(n * (1 - ratio)) heads of n.
    if config.head_ratio and any(int(n * (1 - config.head_ratio)) < 1 for n in heads.values()):
        raise EncoderPruningError(f"pruning.head_ratio {config.head_ratio} would remove every head of a layer")
    ratios: dict[nn.Module, float] = {}
    num_heads: dict[nn.Module, int] = {}
    for layer, a in zip(layers, attention, strict=True):
        if config.ffn_ratio:
            ratios[layer.intermediate.dense] = config.ffn_ratio
        if config.head_ratio:
            # Torch-Pruning removes heads only from layers that also have a ratio of their own
            # (with head dims kept, that ratio is not used); without one it silently does nothing.
            ratios[a.query] = config.head_ratio
            num_heads.update({a.query: heads[a], a.key: heads[a], a.value: heads[a]})
    if ratios:
        writers = [m for layer in layers for m in (layer.attention.output.dense, layer.output.dense)]
        others = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)) and m not in ratios]
        try:
            tp.pruner.MetaPruner(
                model,
                example_inputs,
                forward_fn=forward,
                importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=0.0,
                pruning_ratio_dict=ratios,
                num_heads=num_heads,
                prune_num_heads=bool(config.head_ratio),
                prune_head_dims=False,
                head_pruning_ratio=config.head_ratio,
                ignored_layers=[m for m in writers + others if m not in num_heads],
            ).step()
        except Exception as error:  # Torch-Pruning could not trace or prune this encoder
            raise EncoderPruningError(f"encoder pruning failed: {type(error).__name__}: {error}") from error
    for a in attention:  # what Hugging Face reads besides the weights' shapes
        a.num_attention_heads = a.query.out_features // a.attention_head_size
        a.all_head_size = a.query.out_features
    logger.debug(
        "encoder pruning %s: %d layers, heads %s", config, len(layers), [a.num_attention_heads for a in attention]
    )
    return model


class EncoderPruning(Strategy):
    name = "encoder_pruning"
    phase = "prune"
    default_space = {
        "pruning.head_ratio": FloatParam(0.0, 0.9, off=0.0),
        "pruning.ffn_ratio": FloatParam(0.0, 0.9, off=0.0),
        "pruning.layer_ratio": FloatParam(0.0, 0.9, off=0.0),
    }
    anchors = (Anchor("heads-ffn-50", {"pruning.head_ratio": 0.5, "pruning.ffn_ratio": 0.5}, rank=3),)

    def suggest(self, trial: Any) -> EncoderPruningConfig:
        return EncoderPruningConfig(*(self._suggest(trial, key) for key in self.default_space))

    def is_active(self, config: EncoderPruningConfig) -> bool:
        return bool(config.head_ratio or config.ffn_ratio or config.layer_ratio)

    def apply(self, model: nn.Module, config: EncoderPruningConfig, context: Context) -> nn.Module:
        return prune_encoder_(model, config, context.example_inputs)
