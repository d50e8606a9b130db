"""Fold BatchNorm into the Conv/Linear before it, so quantized weights are what really runs.

Without folding, the deployed int8 weights would be the conv's codes and a float BN after
them, and a runtime that fuses the two would requantize the product with its own codes.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.fx
from torch import nn

from strategies.base import CompressionError

logger = logging.getLogger(__name__)

# A Conv2d's channels are dim 1 of a 4-D tensor (BatchNorm2d's); a Linear's are the last
# dim, which is BatchNorm1d's channel dim only for 2-D inputs, the usual classifier head.
_PAIRS = ((nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


class FoldError(CompressionError):
    pass


def set_submodule_(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule `name` on its parent, keeping every other name unchanged."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    return (
        any(isinstance(layer, a) and isinstance(bn, b) for a, b in _PAIRS)
        and bn.running_mean is not None  # without running stats eval mode uses batch stats
        and bn.num_features == layer.weight.shape[0]
    )


def _fold_pair_(layer: nn.Module, bn: nn.Module) -> None:
    with torch.no_grad():
        # float64 so that folding adds no error of its own beyond the final rounding
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
        factor = gamma / torch.sqrt(var + bn.eps)
        bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.copy_(layer.weight.double() * factor.view(shape))
        new_bias = ((bias - mean) * factor + beta).to(layer.weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias)
        else:
            layer.bias.copy_(new_bias)


def fold_batchnorm_(model: nn.Module) -> list[str]:
    """Fold every BatchNorm that directly follows a Conv2d/Linear, in place.

    A pair is a traced call of a Conv2d/Linear whose only user is a BatchNorm of matching
    size, each module called once (a shared module cannot absorb one caller's BN). The BN
    is replaced by nn.Identity under the same name, so the model keeps its class and module
    names and a stored state can be matched to a fresh factory model. Running statistics
    are used whatever the training flag: eval-mode semantics. Returns the folded BN names.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []  # nothing to fold, and no need for the model to be traceable
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:
        raise FoldError(f"cannot trace the model to fold BatchNorm: {type(error).__name__}: {error}") from error
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    folded = []
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        if calls[node.target] != 1 or calls[source.target] != 1:
            continue
        layer, bn = modules[source.target], modules[node.target]
        if not _foldable(layer, bn):
            continue
        _fold_pair_(layer, bn)
        set_submodule_(model, node.target, nn.Identity())
        folded.append(node.target)
    logger.debug("folded BatchNorm %s", folded)
    return folded
